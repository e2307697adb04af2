"""GPTQ (Frantar et al., ICLR 2023): the algorithm on one matrix and the ``gptq`` method.

The method (``quantize(model, GPTQConfig(format=...), ctx)``) walks the decoder blocks with
the calibration tokens of ``ctx`` (plumbing in ``capture.py``, Hessian cache in
``hessian_cache.py``) and calls :func:`gptq_quantize` on each target linear.

The algorithm on one matrix (Algorithm 1):

``gptq_quantize(W, H, fmt)`` rounds the columns of ``W`` (rows = output features, columns =
input features) one at a time into any format of ``ptqscale.formats`` and, after each column,
moves the rounding error onto the columns not yet rounded so that the layer's output error
``||W X - Q X||^2 = tr((W - Q) H (W - Q)^T) * n / 2`` stays small (``H = 2/n X X^T``, Eq. 1).

How the paper's pieces map here:

- damping: ``H + lambda I`` with ``lambda = percdamp * mean(diag H)`` (Sec. 4, "Cholesky
  reformulation"); a failed Cholesky is retried with 10x the damping (``info.retries``);
- ``Hinv``: the upper Cholesky factor of ``(H + lambda I)^-1``; its row ``i`` from column
  ``i`` on is the OBS update direction once columns ``< i`` are fixed (Alg. 1, line 2);
- lazy batch updates: inside a block of ``blocksize`` columns the update is applied column by
  column (Eq. 3/4: ``err = (w - q) / Hinv[i, i]``; ``W[:, i:] -= err Hinv[i, i:]``), to the rest
  of the matrix once per block (``W[:, i2:] -= Err Hinv[i1:i2, i2:]``, Alg. 1, last line);
- act-order: columns in order of decreasing ``diag(H)`` (Sec. 5, as the reference's
  ``--act-order``); dead columns (``H[i, i] = 0``: an input that is always zero) get
  ``H[i, i] = 1`` and ``W[:, i] = 0``, as the reference does, so nothing divides by zero.

Scale groups (any format): the columns that share a scale are the format's own groups,
``g = fmt.scale_group_size(columns)`` consecutive columns of the ORIGINAL order (per-channel
and per-tensor formats: one group of all columns). A group's scale is fitted when its first
column is reached, on the current (already error-updated) values of all its columns, or up
front on the original weights with ``static_groups``. With act-order the group of a column is
still decided by its original index, so the result is exactly representable in the named
format (contiguous groups, as MX hardware and our storage need). The reference code instead
re-fits a scale every ``g`` columns of the PERMUTED order and records a ``g_idx`` per column:
its groups are then arbitrary sets of columns, which is not the named format; we do not do that.
Unlike the reference we also fit on the up-to-date values when ``g < blocksize`` (it reads
columns of ``W`` that still lack the current block's pending updates).

MX-aware mode (``mx_aware=True``, any grouped format): a whole scale group ``B`` is rounded at
once and its error moves to the later columns through the matching sub-block of the factor,
the multi-column OBS update ``dW_R = -(W_B - Q_B) Hinv_BB^-1 Hinv_BR`` written with the upper
factor ``U`` (``Hinv = U^T U``) as ``Err = (W_B - Q_B) U_BB^-1``, ``W_R -= Err U_BR``. With
act-order, whole groups are ordered by their summed ``diag(H)``.

Example:
    >>> from ptqscale.formats import get_format
    >>> W, X = torch.randn(16, 64), torch.randn(64, 256)
    >>> Q, info = gptq_quantize(W, 2 / 256 * X @ X.T, get_format("int4_g32"))
    >>> Q.shape, info.retries
    (torch.Size([16, 64]), 0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ptqscale.errors import require
from ptqscale.formats import Format, GroupParams, get_format
from ptqscale.formats.base import KERNELS
from ptqscale.methods import gptq_kernel
from ptqscale.methods.base import (
    METHOD_DEVICE,
    MethodConfig,
    QuantContext,
    QuantReport,
    TargetsConfig,
    calibration_ids,
    hash_ids,
    layer_stats,
    parse_format,
    register_method,
    select_targets,
)
from ptqscale.models import resolve_device

# Where a group's scale is fitted when GPTQ reaches its first column (docs/gptq.md): on the
# group's up-to-date columns (ours), or on the weights before the current lazy block's
# updates, as IST-DASLab/gptq and llm-compressor do. They differ only for groups that start
# inside a lazy block (groups smaller than ``blocksize``).
GROUP_FITS = ("current", "reference")


class GPTQNumericalError(RuntimeError):
    """The damped Hessian stayed non positive-definite after every retry."""


@dataclass
class GPTQInfo:
    """What ``gptq_quantize`` did to one matrix (goes into the per-layer record)."""

    percdamp: float  # the damping fraction finally used (percdamp * 10**retries)
    damp: float  # the absolute lambda added to diag(H)
    retries: int  # Cholesky failures before success
    loss: float  # GPTQ's proxy loss: sum of err^2 / 2 (Alg. 1's Losses)
    dead_columns: int  # columns with H[i, i] == 0

    def to_dict(self) -> dict:
        return asdict(self)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, fmt: Format | str, blocksize: int = 128,
                  percdamp: float = 0.01, actorder: bool = False, static_groups: bool = False,
                  mx_aware: bool = False, max_retries: int = 3,
                  kernel: str = "auto", group_fit: str = "current") -> tuple[torch.Tensor, GPTQInfo]:
    """Quantize ``W`` (rows, columns) given the Hessian ``H`` (columns, columns) of its inputs.

    Returns ``(Q, info)``: ``Q`` has ``W``'s shape, dtype and device. fp32 inside, whatever
    ``W``'s dtype: the error feedback accumulates over thousands of columns. Deterministic.
    ``kernel``: the column loop as one Triton launch per lazy block (``"auto"``: on CUDA for
    the formats :mod:`ptqscale.formats.kernels` covers; see :mod:`.gptq_kernel`) or the torch
    loop (``"torch"``); ``"triton"`` fails where the kernel cannot run. ``group_fit``: a
    group's scale is fitted, when its first column is reached, on the group's up-to-date
    columns (``"current"``) or, as the reference code does, on the weights before the updates
    of the current lazy block (``"reference"``; see :data:`GROUP_FITS`).
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    _check(W, H, fmt, blocksize, percdamp, mx_aware, max_retries)
    sweep = _sweep(W, fmt, blocksize, mx_aware, kernel)
    W_orig = W
    W = W.detach().to(torch.float32).clone()
    # One working copy of H, where H waits: on the CPU when the caller offloads it, so that
    # the device holds only the factorization's buffers (``damped_inverse_factor``).
    H = H.detach().to(dtype=torch.float32, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead.to(W.device)] = 0
    groups = ScaleGroups(fmt, W, static_groups, group_fit)
    perm = _order(H, groups, actorder, mx_aware).to(W.device)
    if actorder:  # the identity order needs no permuted copies (n x n each)
        W, H = W[:, perm], H[perm.to(H.device)][:, perm.to(H.device)]
        groups.permute(perm)
    Hinv, frac, damp, retries = damped_inverse_factor(H, percdamp, max_retries, W.device)
    del H  # the sweep needs only the factor (one n x n less at the peak)
    if fmt.exact_on(W_orig.dtype):
        # W's own grid (bf16 into bf16): every column rounds to itself, so every error is 0
        # and no update moves a weight; the sweep would return W and loss 0 bit for bit, after
        # minutes of a torch loop at 1B (the fused kernel covers no plain cast)
        Q, loss = W, 0.0
    else:
        Q, loss = sweep(W, Hinv, groups, blocksize)
    Q = (Q[:, torch.argsort(perm)] if actorder else Q).to(W_orig.dtype)
    return Q, GPTQInfo(frac, damp, retries, loss, int(dead.sum()))


def _sweep(W: torch.Tensor, fmt: Format, blocksize: int, mx_aware: bool, kernel: str):
    """The column sweep to run: MX-aware groups, the fused kernel or the torch loop."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}: allowed {list(KERNELS)}")
    if mx_aware:
        return _groupwise_sweep
    if kernel != "torch" and gptq_kernel.supports(W, fmt, blocksize):
        return gptq_kernel.columnwise_sweep
    if kernel == "triton":
        raise ValueError(f"gptq kernel='triton' cannot run here (device={W.device}, format "
                         f"{fmt.name}, blocksize={blocksize}); use 'auto' or 'torch'")
    return _columnwise_sweep


def damped_inverse_factor(H: torch.Tensor, percdamp: float, max_retries: int,
                          device: torch.device | None = None):
    """``Hinv``: upper Cholesky factor of ``(H + lambda I)^-1`` (Alg. 1, line 2), on
    ``device`` (default: H's).

    ``lambda = percdamp * mean(diag H)``; on a failed factorization the fraction grows 10x, at
    most ``max_retries`` times. Returns ``(Hinv, fraction, lambda, retries)``.
    """
    device = H.device if device is None else device
    mean_diag = torch.diag(H).to(device).mean()  # on the device: the same sum wherever H waits
    info = torch.empty((), dtype=torch.int32, device=device)
    for retry in range(max_retries + 1):
        frac = percdamp * 10.0**retry
        # One n x n buffer on the device (besides H, wherever H waits): lambda added on the
        # diagonal (no identity matrix), then factor, inverse and factor again, each written
        # over its input (``out=`` the input: the same kernels and values; at 14336 columns
        # each n x n copy is 0.8 GB beside a GPU budget). H stays intact for a retry.
        A = H.to(device, copy=True)
        A.diagonal().add_(frac * mean_diag)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if int(info) == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if int(info) == 0 and bool(torch.isfinite(A).all()):
                return A, frac, float(frac * mean_diag), retry
        del A
    raise GPTQNumericalError(
        f"the damped Hessian is not positive definite even with percdamp={frac:g} "
        f"({max_retries} retries); check the calibration inputs for inf/NaN or raise "
        "method.percdamp / method.max_damp_retries")


class ScaleGroups:
    """The format's scale groups of one matrix and their fitted parameters.

    A group is ``g`` consecutive ORIGINAL columns; ``params(pos, current)`` returns the frozen
    parameters of the group of the column at processing position ``pos``, fitting them the
    first time a column of the group is reached (``current(positions)`` gives the up-to-date
    values of the group's columns) unless they were fitted up front (static groups).
    """

    def __init__(self, fmt: Format, W: torch.Tensor, static: bool, fit: str = "current"):
        columns = W.shape[1]
        self.fmt, self.columns, self.fit_rule = fmt, columns, fit
        g = fmt.scale_group_size(columns)
        self.g = columns if g is None or g > columns else g  # per-tensor/per-row: one group
        self.n_groups = -(-columns // self.g)
        # NVFP4's second-level scale is the absmax of the whole (original) tensor, as in RTN
        self.tensor_amax = W.abs().amax() if fmt.needs_tensor_amax else None
        self.fitted: dict[int, GroupParams] = {}
        self.pos_of = torch.arange(columns, device=W.device)  # original column -> position
        self.group_at = (torch.arange(columns) // self.g).tolist()  # position -> group
        if static:  # "static groups": every scale from the original weights, before any update
            for k in range(self.n_groups):
                self.fitted[k] = fmt.fit(W[:, self.cols(k)], self.tensor_amax)

    def cols(self, k: int) -> slice:
        return slice(k * self.g, min((k + 1) * self.g, self.columns))

    def group_of_original(self) -> torch.Tensor:
        return torch.arange(self.columns) // self.g

    def permute(self, perm: torch.Tensor) -> None:
        self.pos_of = torch.argsort(perm)
        self.group_at = (perm.cpu() // self.g).tolist()  # processing position -> group

    def params(self, pos: int, current: Callable[[torch.Tensor], torch.Tensor]) -> GroupParams:
        k = self.group_at[pos]
        if k not in self.fitted:
            self.fitted[k] = self.fmt.fit(current(self.pos_of[self.cols(k)]), self.tensor_amax)
        return self.fitted[k]


def _order(H: torch.Tensor, groups: ScaleGroups, actorder: bool, mx_aware: bool) -> torch.Tensor:
    """Processing order: original, act-order by diag(H), or (MX-aware) whole groups by sum."""
    columns = H.shape[0]
    if not actorder:
        return torch.arange(columns, device=H.device)
    d = torch.diag(H)
    if not mx_aware:  # stable sort: ties keep their original order (deterministic)
        return torch.argsort(d, descending=True, stable=True)
    gid = groups.group_of_original().to(H.device)
    energy = torch.zeros(groups.n_groups, dtype=d.dtype, device=d.device).index_add_(0, gid, d)
    order = torch.argsort(energy, descending=True, stable=True).tolist()
    return torch.cat([torch.arange(columns, device=H.device)[groups.cols(k)] for k in order])


def _columnwise_sweep(W, Hinv, groups: ScaleGroups, blocksize: int):
    """Alg. 1: round column by column, lazy batch updates every ``blocksize`` columns."""
    rows, columns = W.shape
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            p = groups.params(i1 + i, current_values(W, W1, Err1, Hinv, i1, i, groups.fit_rule))
            w, d = W1[:, i], Hinv1[i, i]
            q = groups.fmt.quantize_with(w.unsqueeze(1), p).squeeze(1)
            Q[:, i1 + i] = q
            err = (w - q) / d  # Eq. 3 (Cholesky form): the scaled rounding error
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)  # Eq. 3: OBS update
            Err1[:, i] = err
        loss += Err1.double().square().sum() / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the later columns
    return Q, float(loss)


def current_values(W, W1, Err1, Hinv, i1: int, i: int, rule: str = "current"):
    """Values of not-yet-rounded columns at positions P that a group's scale is fitted on.

    ``current``: up to date, pending updates applied. Columns inside the current lazy block
    are in ``W1`` (already updated); columns after it still lack ``Err1[:, :i] @ Hinv[i1:i1+i,
    P]``, the deferred part of the lazy update. ``reference``: ``W`` as it stands, without the
    updates of the current lazy block (what IST-DASLab/gptq's ``find_params(W[:, ...])`` sees).
    """
    if rule == "reference":
        return lambda P: W[:, P]
    i2 = i1 + W1.shape[1]

    def current(P: torch.Tensor) -> torch.Tensor:
        vals = W[:, P] - Err1[:, :i] @ Hinv[i1:i1 + i, P]
        inside = (P >= i1) & (P < i2)
        vals[:, inside] = W1[:, P[inside] - i1]
        return vals

    return current


def _groupwise_sweep(W, Hinv, groups: ScaleGroups, blocksize: int):
    """MX-aware: round a whole scale group at once; its error moves through ``U_BB^-1 U_BR``."""
    rows, columns = W.shape
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    units = _group_runs(groups)
    u = 0
    while u < len(units):
        i1 = units[u][0]
        block = []
        while u < len(units) and (not block or units[u][1] - i1 <= max(blocksize, groups.g)):
            block.append(units[u])
            u += 1
        i2 = block[-1][1]
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = Hinv[i1:i2, i1:i2]
        for a, b in ((a - i1, b - i1) for a, b in block):
            # the group is exactly these columns of W1 (already updated): fit on them, or
            # (reference rule) on W's, before this block's updates
            src = W1[:, a:b] if groups.fit_rule == "current" else W[:, i1 + a:i1 + b]
            p = groups.params(i1 + a, lambda P, src=src: src)
            Q[:, i1 + a:i1 + b] = groups.fmt.quantize_with(W1[:, a:b], p)
            E = W1[:, a:b] - Q[:, i1 + a:i1 + b]
            # Err = E U_BB^-1: the multi-column OBS update in the factor's coordinates
            Err = torch.linalg.solve_triangular(U1[a:b, a:b], E, upper=True, left=False)
            W1[:, b:] -= Err @ U1[a:b, b:]
            Err1[:, a:b] = Err
        loss += Err1.double().square().sum() / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, float(loss)


def _group_runs(groups: ScaleGroups) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` positions of each group in processing order (contiguous)."""
    runs: list[tuple[int, int]] = []
    for pos, k in enumerate(groups.group_at):
        if runs and groups.group_at[runs[-1][0]] == k:
            runs[-1] = (runs[-1][0], pos + 1)
        else:
            runs.append((pos, pos + 1))
    return runs


def _check(W, H, fmt: Format, blocksize, percdamp, mx_aware, max_retries) -> None:
    if W.ndim != 2 or W.numel() == 0 or not W.is_floating_point():
        raise ValueError(f"W must be a non-empty floating (rows, columns) matrix, got "
                         f"{W.dtype} {tuple(W.shape)}")
    if tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"H must be (columns, columns) = {(W.shape[1], W.shape[1])}, "
                         f"got {tuple(H.shape)}")
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r}: allowed an integer >= 1")
    if not percdamp > 0:
        raise ValueError(f"percdamp={percdamp!r}: allowed a number > 0")
    if not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries={max_retries!r}: allowed an integer >= 0")
    if mx_aware and fmt.block_size is None:
        raise ValueError(f"mx_aware needs a format with scale blocks/groups; {fmt.name} has "
                         f"{fmt.granularity} scales")
    if not bool(torch.isfinite(H).all()) or not bool(torch.isfinite(W).all()):
        raise ValueError("W and H must be finite (found inf or NaN)")


# ---- the method ------------------------------------------------------------------------------


@dataclass
class GPTQConfig(MethodConfig):
    """GPTQ into ``format``; every value that changes the result is a field, with the
    reference implementation's defaults (IST-DASLab/gptq), copied into every record.

    Example:
        >>> cfg = GPTQConfig(format="mxint4_b32", mx_aware=True)
        >>> cfg.percdamp, cfg.blocksize, cfg.actorder, cfg.fp_inputs
        (0.01, 128, False, False)
    """

    needs_calibration: ClassVar[bool] = True

    # kernel: like the device, it changes results only by float rounding (fused multiply-adds)
    not_in_key: ClassVar[tuple[str, ...]] = ("batch_size", "hessian_cache", "device", "offload",
                                             "kernel")
    added_later: ClassVar[dict[str, Any]] = {"group_fit": "current"}  # runner/keys.py
    name: str = "gptq"
    format: str = "int4_g128"
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    allow_padding: bool = True
    percdamp: float = 0.01  # lambda = percdamp * mean(diag H)
    blocksize: int = 128  # columns per lazy batch update
    actorder: bool = False  # columns by decreasing diag(H)
    static_groups: bool = False  # every group scale from the original weights
    true_sequential: bool = True  # re-collect inputs after each input group (q/k/v, o, ...)
    fp_inputs: bool = False  # Hessians from the full-precision model (cacheable)
    mx_aware: bool = False  # round whole scale groups at once (grouped/MX formats)
    max_damp_retries: int = 3  # 10x damping per failed Cholesky, at most this often
    group_fit: str = "current"  # group scales from up-to-date columns | reference (GROUP_FITS)
    batch_size: int = 8  # calibration sequences per forward pass
    hessian_cache: bool = True  # reuse Hessians across jobs (only with fp_inputs)
    device: str = "auto"  # where blocks compute: auto (cuda if available) | cpu | cuda[:N]
    offload: bool = False  # keep calibration activations on the CPU between blocks
    kernel: str = "auto"  # column loop: auto (Triton on CUDA where covered) | torch | triton

    def __post_init__(self) -> None:
        fmt = parse_format(self.format)
        checks = [
            (self.percdamp > 0, f"method.percdamp={self.percdamp} must be > 0"),
            (self.blocksize >= 1, f"method.blocksize={self.blocksize} must be >= 1"),
            (self.batch_size >= 1, f"method.batch_size={self.batch_size} must be >= 1"),
            (self.max_damp_retries >= 0,
             f"method.max_damp_retries={self.max_damp_retries} must be >= 0"),
            (self.kernel in KERNELS, f"method.kernel={self.kernel!r}: allowed {list(KERNELS)}"),
            (self.group_fit in GROUP_FITS,
             f"method.group_fit={self.group_fit!r}: allowed {list(GROUP_FITS)}"),
            (bool(METHOD_DEVICE.match(self.device)),
             f"method.device={self.device!r}: allowed auto, cpu, cuda, cuda:N"),
            (not (self.mx_aware and fmt.block_size is None),
             f"method.mx_aware=true needs a format with scale blocks/groups; {fmt.name} has "
             f"{fmt.granularity} scales"),
            (not (self.targets.head or self.targets.embeddings),
             "gptq quantizes the decoder blocks' linears only; set targets.head=false and "
             "targets.embeddings=false (use rtn for the head)"),
        ]
        require(checks)

    def settings(self) -> dict[str, Any]:
        keys = ("percdamp", "blocksize", "actorder", "static_groups", "true_sequential",
                "fp_inputs", "mx_aware", "max_damp_retries", "group_fit", "batch_size", "hessian_cache",
                "device", "offload", "kernel")
        return {k: getattr(self, k) for k in keys}


@register_method("gptq", GPTQConfig)
def quantize_gptq(model: nn.Module, cfg: GPTQConfig, ctx: QuantContext) -> QuantReport:
    """Quantize the target linears of ``model`` in place with GPTQ, block by block."""
    from ptqscale.methods.capture import WalkPlan, routed_tokens, rtn_fallback, walk_blocks
    from ptqscale.models import get_anatomy

    fmt = get_format(cfg.format)
    calibration = calibration_ids(ctx, "gptq")
    device = resolve_device(cfg.device, "method.device")
    plan = WalkPlan(device, torch.device("cpu") if cfg.offload else device, cfg.batch_size,
                    cfg.fp_inputs, cfg.true_sequential, ctx.progress, f"gptq {cfg.format}")
    anat = get_anatomy(model)
    selected = select_targets(model, anat, cfg.targets)
    cache, cache_info = _open_cache(model, cfg, ctx, plan, calibration)
    report = QuantReport(method="gptq", format=fmt.name)

    def quantize_group(names: list[str], H: torch.Tensor | None, tokens: int, status: str) -> None:
        modules = [(n, selected[n]) for n in names]
        # an MoE expert no calibration token reached has no Hessian: RTN, recorded per layer
        entries = (rtn_fallback(modules, fmt) if H is None
                   else _quantize_group(modules, H, fmt, cfg))
        for e in entries:
            e.update(hessian_cache=status, hessian_tokens=tokens, hessian_of=names[0])
        report.layers.extend(entries)

    was_training = model.training
    model.eval()
    try:
        walk_blocks(model, anat, selected, calibration, plan, quantize_group, cache)
    finally:
        model.train(was_training)
    report.extra = _summary(cfg, device, calibration, ctx, cache_info, report.layers)
    moe = routed_tokens(anat, report.layers)
    if moe is not None:
        report.extra["moe"] = moe
    return report


@torch.no_grad()
def _quantize_group(modules: list[tuple[str, nn.Module]], H: torch.Tensor, fmt: Format,
                    cfg: GPTQConfig) -> list[dict]:
    """GPTQ on the linears that share one input (and Hessian); weights replaced in place.

    Rows are independent given ``H``, so with per-row scales the group's weights are stacked
    into one matrix (one Cholesky, one column sweep: q/k/v cost one pass instead of three).
    """
    Ws = [m.weight.data for _, m in modules]
    device = Ws[0].device  # H stays where the walk keeps it: gptq_quantize copies it over
    kw = dict(blocksize=cfg.blocksize, percdamp=cfg.percdamp, actorder=cfg.actorder,
              static_groups=cfg.static_groups, mx_aware=cfg.mx_aware,
              max_retries=cfg.max_damp_retries, kernel=cfg.kernel, group_fit=cfg.group_fit)
    if len(Ws) > 1 and not (fmt.per_tensor or fmt.needs_tensor_amax):
        Q, info = gptq_quantize(torch.cat(Ws), H, fmt, **kw)
        results = [(Qi, info) for Qi in Q.split([W.shape[0] for W in Ws])]
    else:
        results = [gptq_quantize(W, H, fmt, **kw) for W in Ws]
    entries = []
    for (name, module), W, (Q, info) in zip(modules, Ws, results, strict=True):
        entry = layer_stats(name, W, Q, fmt.padding_needed(W.shape[1]))
        entry.update(info.to_dict())
        entry.update(output_errors(W, Q, fmt.fake_quantize(W), H.to(device)))
        module.weight.data.copy_(Q)
        entries.append(entry)
    return entries


ERROR_CHUNK = 4096  # columns of H per float64 product in output_errors


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def output_energy(D: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(D H D^T) / 2``: the mean squared output error per token of a weight change ``D``
    given ``H = 2/n X X^T``; in float64, over column chunks of H (never a float64 n x n: 1.6 GB
    at n = 14336)."""
    D = D.double()
    return math.fsum(float(((D @ H[:, c].double()) * D[:, c]).sum())
                     for c in _chunks(H.shape[1], ERROR_CHUNK)) / 2


def output_errors(W: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, H: torch.Tensor) -> dict:
    """Output reconstruction error on the calibration inputs of GPTQ (``Q``) and RTN (``R``).

    ``(1/n) ||W X - Q X||_F^2 = tr((W - Q) H (W - Q)^T) / 2`` with ``H = 2/n X X^T``: the mean
    squared output error per token (summed over output features), from ``H`` alone; ``rel``
    divides by the same quantity of ``W`` (the output energy).
    """
    def energy(D: torch.Tensor) -> float:
        return output_energy(D, H)

    signal = energy(W)
    gptq, rtn = energy(W - Q), energy(W - R)
    rel = (lambda e: e / signal) if signal > 0 else (lambda e: None)
    return {"out_err_gptq": gptq, "out_err_rtn": rtn, "out_rel_gptq": rel(gptq),
            "out_rel_rtn": rel(rtn)}


def _open_cache(model, cfg: GPTQConfig, ctx: QuantContext, plan, calibration):
    """The Hessian cache of this (model, calibration, pass settings), or None and why not."""
    from ptqscale.methods.hessian_cache import HessianCache, model_fingerprint

    reason = None
    if not cfg.hessian_cache:
        reason = "method.hessian_cache=false"
    elif not cfg.fp_inputs:
        reason = "fp_inputs=false: each layer's inputs depend on the format"
    elif ctx.cache_dir is None:
        reason = "no cache_dir in the QuantContext"
    if reason:
        return None, {"enabled": False, "reason": reason}
    calib_hash = ctx.calibration_hash or hash_ids(calibration)
    material = {"model": model_fingerprint(model), "calibration": calib_hash,
                "dtype": str(next(model.parameters()).dtype), "device": plan.device.type,
                "batch_size": cfg.batch_size}
    cache = HessianCache.open(ctx.cache_dir, material)
    return cache, {"enabled": True, "key": cache.key, "dir": cache.folder}


def _summary(cfg, device, calibration, ctx, cache_info: dict, layers: list[dict]) -> dict:
    statuses = [layer["hessian_cache"] for layer in layers]
    cache_info = {**cache_info, "hits": statuses.count("hit"), "misses": statuses.count("miss")}
    cache_info["hit"] = bool(layers) and cache_info["misses"] == 0 and cache_info["hits"] > 0
    return {
        "gptq": {**cfg.settings(), "device": str(device)},
        "calibration": {"nsamples": int(calibration.shape[0]),
                        "seqlen": int(calibration.shape[1]),
                        "hash": ctx.calibration_hash or hash_ids(calibration)},
        "hessian_cache": cache_info,
        "damp_retries": sum(layer.get("retries", 0) for layer in layers),
        "max_percdamp_used": max((layer["percdamp"] for layer in layers if "percdamp" in layer),
                                 default=None),
        "out_err_gptq": math.fsum(layer.get("out_err_gptq", 0.0) for layer in layers),
        "out_err_rtn": math.fsum(layer.get("out_err_rtn", 0.0) for layer in layers),
        "rtn_fallback": sum(layer.get("fallback") == "rtn" for layer in layers),
    }
