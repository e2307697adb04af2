"""The :class:`Format` contract, the :class:`Encoded` record and the block layout.

Every scaled format works on a *blocked view* of the tensor: the quantization axis is moved
last, zero-padded up to a multiple of the group length ``g`` and reshaped to
``(..., n_groups, g)``. A subclass implements four small tensor functions on that view:

- ``_fit(xb, tensor_amax)``   -> :class:`GroupParams` (one scale per group, broadcastable)
- ``_fake(xb, p)``            -> float32 values on the grid (the fast, fused path)
- ``_codes(xb, p)``           -> integer codes;  ``_values(codes, p)`` -> float32 values
- ``_store(p)`` / ``_load(enc)`` -> scales in their storage format (fp16, e8m0 codes, ...)

and the base class turns them into ``fake_quantize`` / ``encode`` / ``decode`` / ``fit`` /
``quantize_with``. Zero padding never changes a scale (absmax ignores zeros and the
asymmetric INT range always contains 0), so ``fake_quantize`` handles a short last block
as its own group instead of padding it.

Non-finite values (docs/formats.md, "Non-finite values"): a NaN or +-inf element is kept as
it is in the output and counts as 0 when its group's scale is fitted, so it never changes
the other elements; ``encode`` refuses it (no code holds it). One place applies this for
every format: :func:`finite_part` here, and its twin ``kernels_jit._finite`` in the fused kernels.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels

KERNELS = ("auto", "torch", "triton")
_F32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class GroupParams:
    """Fitted parameters of scale groups; each tensor broadcasts against the group values.

    ``scale`` is the float32 multiplier of the element grid, already rounded to its storage
    format (MX: the int32 shared exponent k of the scale 2**k); ``zero`` the integer zero
    point (asymmetric INT); ``tensor_scale`` the float32 second-level scale of NVFP4 (``scale``
    is then the E4M3 block scale). Shapes: one entry per row of ``fit``'s input (per-tensor
    formats: a single one).
    """

    scale: torch.Tensor
    zero: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class Encoded:
    """Codes and scales of one tensor: enough to decode it and to count its bits exactly.

    ``codes`` has the blocked shape ``(..., n_groups, g)`` (quantization axis moved last,
    ``pad`` zeros appended along it); one code per element in an integer dtype (not bit-packed).
    ``scale`` is stored in its format's own dtype: float16 / float32 values, or uint8 codes
    for E8M0 (MX) and E4M3 (NVFP4) scales.
    """

    format: str
    codes: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    tensor_scale: torch.Tensor | None
    shape: tuple[int, ...]
    axis: int
    pad: int
    dtype: torch.dtype
    element_bits: int
    scale_bits: int
    zero_bits: int

    @property
    def padded(self) -> bool:
        return self.pad > 0

    def nbits(self) -> int:
        """Stored bits: codes (padding included), scales, zero points and the tensor scale."""
        bits = self.codes.numel() * self.element_bits
        bits += 0 if self.scale is None else self.scale.numel() * self.scale_bits
        bits += 0 if self.zero is None else self.zero.numel() * self.zero_bits
        return bits + (0 if self.tensor_scale is None else 32)


def finite_part(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x with NaN / +-inf replaced by 0, mask of its finite elements)``.

    Every format fits and rounds the zeroed tensor, then puts the non-finite elements back
    (``torch.where(finite, y, x)``): a NaN stays NaN, +-inf stays +-inf, and the rest of the
    group is quantized as if that element were 0 (as zero padding is). No data-dependent
    branch, so it traces under torch.compile and costs no device sync. (``nan_to_num`` and
    ``==`` rather than ``torch.isfinite``, which is ~8x slower on CPU: one pass each.)
    """
    xz = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return xz, xz == x  # False exactly where x was NaN or +-inf (0 == 0 and -0 == 0 hold)


def finite_mask(x: torch.Tensor) -> torch.Tensor:
    """True where ``x`` is finite: ``|x| <= float32 max`` (False for NaN and +-inf), two cheap
    passes where ``torch.isfinite`` takes four on CUDA and is ~8x slower on CPU."""
    return x.abs() <= _F32_MAX


def _refuse_non_finite(x: torch.Tensor, what: str) -> None:
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        raise ValueError(
            f"{what}: {bad.shape[0]} non-finite value(s) (NaN/inf), first at index "
            f"{tuple(bad[0].tolist())}; integer codes cannot hold them (fake_quantize keeps "
            "them in place, docs/formats.md 'Non-finite values')")


def _normalize_axis(x: torch.Tensor, axis: int) -> int:
    if not isinstance(axis, int) or not -x.ndim <= axis < max(x.ndim, 1):
        raise ValueError(f"axis={axis!r} out of range for a tensor of shape {tuple(x.shape)}")
    return axis % x.ndim


class Format(abc.ABC):
    """A number format. Obtain one with ``get_format(name)``; see the package docstring.

    Example:
        >>> fmt = get_format("mxint4_b128")
        >>> w = torch.randn(8, 256, dtype=torch.bfloat16)
        >>> fmt.fake_quantize(w).shape, fmt.bits_per_weight
        (torch.Size([8, 256]), 4.0625)
    """

    family: str
    element_bits: int
    block_size: int | None = None  # group length along the axis; None: per-tensor or per-channel
    per_tensor: bool = False  # one scale for the whole tensor
    scale_format: str = "none"
    scale_bits: int = 0
    zero_bits: int = 0
    needs_tensor_amax: bool = False  # fit() needs the amax of the whole tensor (NVFP4)
    codes_hold_non_finite: bool = False  # encode() keeps NaN / inf (raw float codes)

    # ---- identity -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Canonical short name; ``get_format(fmt.name) == fmt``."""

    @property
    def bits_per_weight(self) -> float:
        """Element bits + block scale/zero-point bits amortised over the block.

        Per-tensor and per-channel scales are not counted (they vanish as the tensor or row
        grows); :meth:`storage_bits` counts everything for a given shape.
        """
        if self.block_size is None:
            return float(self.element_bits)
        return self.element_bits + (self.scale_bits + self.zero_bits) / self.block_size

    def describe(self) -> dict:
        """Flat, JSON-able features for result records."""
        return {
            "name": self.name, "family": self.family, "element": self.element_name,
            "element_bits": self.element_bits, "block_size": self.block_size,
            "granularity": self.granularity, "scale_format": self.scale_format,
            "scale_bits": self.scale_bits, "zero_point": self.zero_bits > 0,
            "symmetric": self.symmetric, "bits_per_weight": self.bits_per_weight,
            "element_max": self.element_max, "scale_rule": self.scale_rule,
        }

    element_name: str = ""
    symmetric: bool = True
    element_max: float | None = None
    scale_rule: str = "absmax"

    @property
    def granularity(self) -> str:
        if self.per_tensor:
            return "tensor"
        return "channel" if self.block_size is None else "block"

    def __repr__(self) -> str:
        return f"get_format({self.name!r})"

    # ---- layout ---------------------------------------------------------------------------
    def scale_group_size(self, n_in: int) -> int | None:
        """Columns sharing one scale along an axis of length n_in (None: the whole tensor)."""
        if self.per_tensor:
            return None
        return n_in if self.block_size is None else self.block_size

    def exact_on(self, dtype: torch.dtype) -> bool:
        """Whether every value of ``dtype`` is on this format's grid, whatever its group: then
        fake_quantize is the identity on a tensor of that dtype (a 16-bit baseline on its own
        dtype) and a method's rounding moves nothing."""
        return False

    def padding_needed(self, n: int) -> int:
        """Zeros appended to an axis of length n so that it splits into whole blocks."""
        return 0 if self.block_size is None else (-n) % self.block_size

    def storage_bits(self, shape: tuple[int, ...], axis: int = -1) -> int:
        """Exact stored bits of a tensor of this shape (padding, every scale and zero point)."""
        shape = tuple(shape)
        n = shape[axis]
        g = self.block_size or n
        groups = math.prod(shape) // max(n, 1) * ((n + self.padding_needed(n)) // max(g, 1))
        elems = groups * g
        n_scales = 1 if self.per_tensor else groups
        extra = 32 if self.needs_tensor_amax else 0
        n_scales = n_scales if self.scale_bits else 0
        return elems * self.element_bits + n_scales * (self.scale_bits + self.zero_bits) + extra

    def _checked_axis(self, x: torch.Tensor, axis: int) -> int:
        if not (x.is_floating_point() and x.ndim >= 1 and x.numel() > 0):
            raise ValueError(f"{self.name}: need a non-empty floating tensor with ndim >= 1, got "
                             f"dtype={x.dtype} shape={tuple(x.shape)}")
        return _normalize_axis(x, axis)

    def _moved(self, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, int]:
        """float32 ``x`` with the quantization axis last (validated first)."""
        axis = self._checked_axis(x, axis)
        return x.movedim(axis, -1).to(torch.float32), axis

    def _blocks(self, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, int, int]:
        """(..., n_groups, g) view of ``x`` (axis last, zero-padded), the axis and the pad."""
        xm, axis = self._moved(x, axis)
        n = xm.shape[-1]
        pad = self.padding_needed(n)
        if pad:
            xm = F.pad(xm, (0, pad))
        g = self.block_size or n
        return xm.reshape(*xm.shape[:-1], (n + pad) // g, g), axis, pad

    @staticmethod
    def _unblock(yb: torch.Tensor, shape, axis: int, pad: int, dtype) -> torch.Tensor:
        y = yb.reshape(*yb.shape[:-2], -1)
        if pad:
            y = y[..., : y.shape[-1] - pad]
        return y.movedim(-1, axis).to(dtype).reshape(shape)

    # ---- public tensor API ----------------------------------------------------------------
    def fake_quantize(self, x: torch.Tensor, axis: int = -1, kernel: str = "auto") -> torch.Tensor:
        """decode(encode(x)) without materialising codes; same shape and dtype as ``x``.

        ``kernel``: ``"auto"`` takes the fused Triton kernel (:mod:`.kernels`; bitwise equal
        to the torch reference) for CUDA tensors of the formats it covers, else the reference;
        ``"torch"`` forces the reference; ``"triton"`` fails where the kernel cannot run.
        """
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: allowed {list(KERNELS)}")
        if kernel != "torch":
            fast = kernels.fake_quantize_triton(self, x, self._checked_axis(x, axis))
            if fast is not None:
                return fast
            if kernel == "triton":
                raise ValueError(f"{self.name}: no Triton kernel for this format / tensor "
                                 f"(device={x.device}, dtype={x.dtype}, triton installed: "
                                 f"{kernels.available()})")
        xm, ax = self._moved(x, axis)
        xz, finite = finite_part(xm)
        n = xm.shape[-1]
        g = self.block_size or n
        ta = xz.abs().amax() if self.needs_tensor_amax else None
        # A short last block is quantized on its own instead of zero-padded: same scales (zeros
        # never change them), and no pad-then-slice, which Inductor (torch 2.13, CPU) miscompiles.
        cut = n - n % g
        parts = [self._fake_span(xz[..., :cut], g, ta)] if cut else []
        if cut < n:
            parts.append(self._fake_span(xz[..., cut:], n - cut, ta))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return torch.where(finite, y, xm).movedim(-1, ax).to(x.dtype)

    def _fake_span(self, xm: torch.Tensor, g: int, ta) -> torch.Tensor:
        xb = xm.reshape(*xm.shape[:-1], xm.shape[-1] // g, g)
        return self._fake(xb, self._fit(xb, ta)).reshape(xm.shape)

    def encode(self, x: torch.Tensor, axis: int = -1) -> Encoded:
        """Integer codes and stored scales of ``x`` (groups along ``axis``).

        A NaN or inf in ``x`` raises ValueError (before any work) unless the codes are raw
        float bit patterns that hold it (``codes_hold_non_finite``: the 16-bit baselines).
        """
        self._checked_axis(x, axis)
        if not self.codes_hold_non_finite:
            _refuse_non_finite(x, f"{self.name}.encode")
        xb, ax, pad = self._blocks(x, axis)
        p = self._fit(xb, None)
        scale, zero, tscale = self._store(p)
        return Encoded(self.name, self._codes(xb, p), scale, zero, tscale, tuple(x.shape),
                       ax, pad, x.dtype, self.element_bits, self.scale_bits, self.zero_bits)

    def decode(self, enc: Encoded) -> torch.Tensor:
        """The tensor (original shape and dtype) that ``enc`` represents."""
        if enc.format != self.name:
            raise ValueError(f"cannot decode a {enc.format!r} record with format {self.name!r}")
        yb = self._values(enc.codes, self._load(enc))
        return self._unblock(yb, enc.shape, enc.axis, enc.pad, enc.dtype)

    def fit(self, w_cols: torch.Tensor, tensor_amax: torch.Tensor | float | None = None):
        """Fit the parameters of ONE scale group: ``w_cols`` is (rows, k), k <= group length.

        Returns per-row :class:`GroupParams` (per-tensor formats: one scale for all of
        ``w_cols``). NVFP4 also needs ``tensor_amax``, the absmax of the whole tensor.
        Missing columns of a partial group behave like the zero padding of fake_quantize, and
        so do NaN / inf entries of ``w_cols`` (``tensor_amax`` is then that of the finite
        values; an inf or NaN ``tensor_amax`` makes every NVFP4 value NaN).
        """
        if w_cols.ndim != 2:
            raise ValueError(f"{self.name}.fit: w_cols must be (rows, k), got {tuple(w_cols.shape)}")
        if self.needs_tensor_amax and tensor_amax is None:
            raise ValueError(f"{self.name}.fit needs tensor_amax=W.abs().amax() of the whole tensor")
        ta = None if tensor_amax is None else torch.as_tensor(tensor_amax, dtype=torch.float32)
        return self._fit(finite_part(w_cols.to(torch.float32))[0].unsqueeze(-2), ta)

    def quantize_with(self, w_cols: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """Round columns of a group with frozen ``params`` (from :meth:`fit`); keeps dtype.

        NaN / inf entries are returned as they are (the non-finite policy of fake_quantize).
        """
        if w_cols.ndim != 2:
            raise ValueError(f"{self.name}.quantize_with: w_cols must be (rows, k)")
        w = w_cols.to(torch.float32)
        # _fake is elementwise once params are frozen: only the non-finite outputs need putting
        # back (two ops, not three: GPTQ's torch loop calls this once per column)
        y = self._fake(w.unsqueeze(-2), params).squeeze(-2)
        return torch.where(finite_mask(w), y, w).to(w_cols.dtype)

    # ---- what a family implements -----------------------------------------------------------
    @abc.abstractmethod
    def _fit(self, xb: torch.Tensor, tensor_amax: torch.Tensor | None) -> GroupParams: ...

    @abc.abstractmethod
    def _fake(self, xb: torch.Tensor, p: GroupParams) -> torch.Tensor: ...

    @abc.abstractmethod
    def _codes(self, xb: torch.Tensor, p: GroupParams) -> torch.Tensor: ...

    @abc.abstractmethod
    def _values(self, codes: torch.Tensor, p: GroupParams) -> torch.Tensor: ...

    def _store(self, p: GroupParams):
        return p.scale, p.zero, p.tensor_scale

    def _load(self, enc: Encoded) -> GroupParams:
        return GroupParams(enc.scale.to(torch.float32), enc.zero, enc.tensor_scale)

    # ---- what methods and the fast path ask of a format -----------------------------------
    # A method or kernel never dispatches on a format's class or name: it asks the format.
    learnable_scale: bool = False  # the scale is a free float in storage: a method may learn it
    element_type: bool = False  # the name is a bare element type (int<b>, fp<b>_e<E>m<M>)

    def round_scale(self, s: torch.Tensor) -> torch.Tensor:
        """float32 scales rounded to what storage holds (only where ``learnable_scale``)."""
        raise NotImplementedError(f"{self.name}: its scale ({self.scale_format}) is not a free "
                                  "float; a method cannot set it")

    def round_elements(self, y: torch.Tensor) -> torch.Tensor:
        """Already-scaled values rounded onto the element grid, saturating at +-element_max.

        Only for element types (``element_type``): a method that places its own scales (per
        token, per channel, CrossQuant) rounds with the format's element rule through this.
        NaN and +-inf are returned as they are (never saturated to a finite value).
        """
        raise NotImplementedError(f"{self.name}: not an element type; its scales are its own")

    def kernel_spec(self) -> dict | None:
        """The fused kernel's description of this format's rule, or None (the kernel declines).

        A format returns a spec only where the kernel's arithmetic is exactly its reference
        (:mod:`.kernels`); :func:`kernels.spec_of` also declines a subclass that changed the
        rule (``_fit`` / ``_fake``) without restating its spec.
        """
        return None

    def group_length(self, columns: int) -> int:
        """Columns per scale group of a (rows, columns) weight (per-tensor/channel: all)."""
        g = self.scale_group_size(columns)
        return columns if g is None or g > columns else g

    def to_groups(self, W: torch.Tensor) -> torch.Tensor:
        """(rows, columns) -> (rows * n_groups, g) float32, zero-padded to whole groups.

        One scale group per row, so that :meth:`fit` / :meth:`quantize_with` (per-row
        parameters) treat every group of a weight at once; :meth:`from_groups` undoes it.
        """
        rows, columns = W.shape
        g = self.group_length(columns)
        pad = (-columns) % g
        Wp = F.pad(W.to(torch.float32), (0, pad)) if pad else W.to(torch.float32)
        return Wp.reshape(rows * ((columns + pad) // g), g)

    @staticmethod
    def from_groups(Wg: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        """The (rows, columns) weight of a :meth:`to_groups` view (padding dropped)."""
        return Wg.reshape(rows, -1)[:, :columns]

    def _amax(self, xb: torch.Tensor) -> torch.Tensor:
        """absmax per group (keepdim), or of everything for per-tensor formats."""
        a = xb.abs()
        if self.per_tensor:
            return a.amax().reshape([1] * xb.ndim)
        return a.amax(dim=-1, keepdim=True)

