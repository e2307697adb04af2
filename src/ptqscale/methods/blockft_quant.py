"""The learnable quantizer of block-wise fine-tuning: rounding offsets and scales, STE gradients.

One target weight ``W`` (rows, columns) is quantized as

    ``Q = q(A + Delta * clamp(V, -b, b); m * s0)``

- ``q(x; s)`` is the number format's own rounding with frozen group parameters
  (``Format.quantize_with``), so the result is always a value of the named format;
- ``A`` is the anchor: ``W`` itself (``init: rtn``, then ``Q = RTN(W)`` at ``V = 0``) or GPTQ's
  result (``init: gptq``, then ``Q = GPTQ(W)`` at ``V = 0``);
- ``V`` is a learned per-weight rounding offset in units of ``Delta``, the group's mean grid
  step ``(max - min of the grid) / (2**bits - 1)``, clamped to ``[-b, b]`` (``offset_bound``);
  ``b > 1/2`` lets every weight move to either neighbour of its nearest grid point;
- ``s0`` are the group parameters (scale, zero point) fitted by the format's rule (or recorded
  from GPTQ), ``m = exp(gamma)`` a learned per-group scale multiplier. ``m`` is learned only
  where the format stores its scale as a free float (``Format.learnable_scale``; rounded by
  ``Format.round_scale`` in every forward so that the result stays representable: INT fp16,
  FP per-tensor and NF4 fp32). MX (power-of-
  two E8M0 scales) and NVFP4 (E4M3 block scale and a tensor scale) keep the format's scale
  rule: only the offsets are learned.

Gradients are straight-through: inside the grid's range ``dQ/dx = 1`` (0 where it clips), and
the scale gets the LSQ gradient ``dQ/dm = Q/m - (x/m) * [x inside]`` (Esser et al. 2020),
written so that the forward value is exactly the format's rounding.

The layout: columns are zero-padded to whole scale groups and the matrix is viewed as
``(rows * n_groups, g)``, one group per row, so that the format's public ``fit`` /
``quantize_with`` (per-row parameters) treat every group at once.

Example:
    >>> fmt = get_format("int3_g32")
    >>> W = torch.randn(8, 64)
    >>> lw = LearnedWeight.from_rtn(W, fmt, learn_scale=True, bound=1.0)
    >>> torch.equal(lw().detach(), fmt.fake_quantize(W))
    True
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ptqscale.formats import Format, GroupParams, get_format  # noqa: F401  (doctest)


class LearnedWeight(nn.Module):
    """``Q = q(A + Delta * clamp(V, -b, b); exp(gamma) * s0)``; call it for ``Q`` (fp32)."""

    def __init__(self, W: torch.Tensor, fmt: Format, anchor: torch.Tensor, params: GroupParams,
                 learn_scale: bool, bound: float):
        super().__init__()
        self.fmt, self.bound, self.shape = fmt, float(bound), tuple(W.shape)
        self.g = fmt.group_length(W.shape[1])
        self.register_buffer("weight", W.detach().clone())  # the full-precision weight
        self.register_buffer("anchor", fmt.to_groups(anchor.detach()))
        self.params = params
        self.learn_scale = bool(learn_scale) and fmt.learnable_scale
        lo, hi = self._extremes(params)
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)
        self.register_buffer("unit", ((hi - lo) / (2**fmt.element_bits - 1)).clamp_min(1e-30))
        self.V = nn.Parameter(torch.zeros_like(self.anchor))
        # one log-multiplier per group, shaped like a column of the grouped view (or (1, 1))
        n = params.scale.numel()
        self.gamma = nn.Parameter(torch.zeros(n, 1, device=W.device),
                                  requires_grad=self.learn_scale)

    @classmethod
    def from_rtn(cls, W: torch.Tensor, fmt: Format, learn_scale: bool, bound: float):
        """Anchor ``W`` and the format's own scale rule: ``Q = fmt.fake_quantize(W)`` at init."""
        amax = W.detach().abs().amax().float() if fmt.needs_tensor_amax else None
        params = fmt.fit(fmt.to_groups(W.detach()), amax)
        return cls(W, fmt, W, params, learn_scale, bound)

    @classmethod
    def from_fitted(cls, W: torch.Tensor, Q: torch.Tensor, fmt: Format, fits: list[GroupParams],
                    learn_scale: bool, bound: float):
        """Anchor ``Q`` (e.g. GPTQ's) with the per-group parameters ``fits`` it was rounded with
        (one per scale group, in column order, each with one entry per row)."""
        params = stack_group_params(fits, W.shape[0])
        return cls(W, fmt, Q, params, learn_scale, bound)

    def _extremes(self, p: GroupParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest and largest grid value of every group (per row of the grouped view)."""
        big = 64.0 * (self.anchor.abs().amax(dim=1, keepdim=True) + 1.0)
        y = self.fmt.quantize_with(torch.cat([-big, big], dim=1), p)
        return y[:, :1].clone(), y[:, 1:].clone()

    def multiplier(self) -> torch.Tensor:
        return torch.exp(self.gamma)

    def scaled_params(self, m: torch.Tensor) -> GroupParams:
        """The group parameters with the scale times ``m``, rounded to the scale's storage."""
        s = self.params.scale * m.detach().reshape(self.params.scale.shape)
        return replace(self.params, scale=self.fmt.round_scale(s))  # stays representable

    def forward(self) -> torch.Tensor:
        x = self.anchor + self.unit * self.V.clamp(-self.bound, self.bound)
        if not self.learn_scale:
            with torch.no_grad():
                y0 = self.fmt.quantize_with(x, self.params)
                inside = ((x >= self.lo) & (x <= self.hi)).to(x.dtype)
            xi = x * inside
            y = y0 + (xi - xi.detach())  # STE, zero gradient where the grid clips
            return self.fmt.from_groups(y, *self.shape)
        m = self.multiplier()
        p = self.scaled_params(m)
        # the multiplier actually applied (after rounding to storage), as a column
        ratio = (p.scale / self.params.scale).reshape(-1, 1)
        with torch.no_grad():
            y0 = self.fmt.quantize_with(x, p)
            inside = ((x >= self.lo * ratio) & (x <= self.hi * ratio)).to(x.dtype)
        z = x / m * inside
        # value: y0 exactly; d/dx = inside; d/dm = y0/m - (x/m) * inside (LSQ)
        y = y0 + m * (z - z.detach()) + (m - m.detach()) * (y0 / m).detach()
        return self.fmt.from_groups(y, *self.shape)

    @torch.no_grad()
    def quantized(self) -> torch.Tensor:
        """The final weight: exactly a value of the format, in ``W``'s dtype."""
        return self().to(self.weight.dtype)

    @torch.no_grad()
    def initial(self) -> torch.Tensor:
        """The weight at ``V = 0, gamma = 0``: the anchor rounded with the initial parameters."""
        return self.fmt.from_groups(self.fmt.quantize_with(self.anchor, self.params), *self.shape)


def stack_group_params(fits: list[GroupParams], rows: int) -> GroupParams:
    """Per-group parameters (one per scale group, each ``(rows | 1, 1, 1)``) -> the grouped
    view's ``(rows * n_groups | 1, 1, 1)``."""
    def stack(ts):
        if ts[0] is None:
            return None
        if ts[0].numel() == 1 and len(ts) == 1:
            return ts[0]  # per-tensor: one scale for everything
        return torch.stack([t.reshape(rows) for t in ts], dim=1).reshape(-1, 1, 1)

    tensor_scale = fits[0].tensor_scale  # NVFP4: one for the whole tensor
    return GroupParams(stack([p.scale for p in fits]), stack([p.zero for p in fits]), tensor_scale)


class RecordingFormat:
    """A format that remembers every ``fit`` it returns: wraps a format for ``gptq_quantize``
    so that GPTQ's scale-group parameters (fitted on its error-updated columns) are known.

    Without act-order GPTQ fits its groups exactly once each, in column order, so
    ``fits[k]`` are the parameters of scale group ``k``.
    """

    def __init__(self, fmt: Format):
        self._fmt = fmt
        self.fits: list[GroupParams] = []

    def __getattr__(self, name):
        return getattr(self._fmt, name)

    def fit(self, w_cols: torch.Tensor, tensor_amax=None) -> GroupParams:
        p = self._fmt.fit(w_cols, tensor_amax)
        self.fits.append(p)
        return p


def gptq_with_params(W: torch.Tensor, H: torch.Tensor, fmt: Format, percdamp: float,
                     blocksize: int) -> tuple[torch.Tensor, list[GroupParams], object]:
    """GPTQ (reference defaults, no act-order) and the parameters of each of its scale groups."""
    from ptqscale.methods.gptq import gptq_quantize

    rec = RecordingFormat(fmt)
    Q, info = gptq_quantize(W, H, rec, blocksize=blocksize, percdamp=percdamp)
    return Q, rec.fits, info
