"""Athena (Wang et al. 2024): block-wise PTQ guided by second-order information, our reading.

We could not read the paper itself; this is our reading of the issue's summary ("quantizing
groups of columns in turn and updating the rest of the weights and the inverse Hessian after
each group"; "a k-means codebook per group"; "an optional low-rank correction of the residual
error") within the OBS/GPTQ framework. Per linear layer with ``H = 2/n X X^T`` from calibration
(GPTQ's collection, quantized inputs, true-sequential), columns go in groups of ``g``:

1. the group ``B`` (``g`` consecutive columns, in order) is quantized at once, from its current
   (already error-updated) values: into the format's uniform grid (its own scale groups, fitted
   as GPTQ fits them, ``quantize_with``), or into a codebook of ``2**bits`` levels per row of
   the group, fitted by ``kmeans_iters`` Lloyd iterations weighted by each column's OBS
   importance ``1 / [H^-1]_jj`` (levels stored as fp16);
2. the remaining columns ``R`` take the multi-column OBS update
   ``W_R -= (W_B - Q_B) [H^-1]_BB^-1 [H^-1]_BR``;
3. the inverse Hessian is downdated to the remaining columns, the Schur complement
   ``[H^-1]_RR - [H^-1]_RB [H^-1]_BB^-1 [H^-1]_BR``.

Steps 2-3 are carried by the upper Cholesky factor ``U`` of the damped ``H^-1`` (``H^-1 =
U^T U``): the update is ``Err = (W_B - Q_B) U_BB^-1``, ``W_R -= Err U_BR``, and the downdated
inverse is ``U_RR^T U_RR``, i.e. nothing to compute (GPTQ's Cholesky reformulation). Updates of
columns past the current lazy block are applied once per block (GPTQ's lazy batching). With
``g = 1`` and the uniform grid this is GPTQ column by column, operation for operation: the two
give the same weights exactly (tested).

"(or rows)": rows of a linear layer do not interact through ``H`` (it is over input columns),
so grouping rows changes no update; only column groups are implemented.

Low-rank correction (``lowrank_rank = r > 0``, off by default): the residual ``W - Q`` is
approximated in the layer's output metric, ``min ||(W - Q - A B) X||`` = the rank-``r``
truncated SVD of ``(W - Q) L`` with ``H = L L^T``, then ``B <- B L^-1``; ``A`` and ``B`` are
stored in fp16 and the layer's weight becomes ``Q + A B``. Its ``16 r (rows + columns)`` bits
are counted in the record's ``bits_per_weight`` (as are the fp16 codebook levels).

Example:
    >>> from ptqscale.formats import get_format
    >>> W, X = torch.randn(16, 64), torch.randn(64, 256)
    >>> Q, info = athena_quantize(W, 2 / 256 * X @ X.T, get_format("int4_g32"), group_size=8)
    >>> Q.shape, info.group_size
    (torch.Size([16, 64]), 8)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ptqscale.errors import require
from ptqscale.formats import Format, get_format
from ptqscale.methods.base import (
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
from ptqscale.methods.gptq import (
    ScaleGroups,
    current_values,
    damped_inverse_factor,
    output_energy,
)

CODEBOOKS = ("uniform", "kmeans")


@dataclass
class AthenaInfo:
    """What ``athena_quantize`` did to one matrix."""

    percdamp: float
    damp: float
    retries: int
    loss: float  # sum of the scaled errors Err^2 / 2 (GPTQ's proxy loss)
    dead_columns: int
    group_size: int
    codebook: str
    lowrank_rank: int
    storage_bits: int  # codes + scales / codebook levels + low-rank factors

    def to_dict(self) -> dict:
        return asdict(self)


def athena_quantize(W: torch.Tensor, H: torch.Tensor, fmt: Format | str, group_size: int = 1,
                    codebook: str = "uniform", kmeans_iters: int = 10, blocksize: int = 128,
                    percdamp: float = 0.01, lowrank_rank: int = 0,
                    max_retries: int = 3) -> tuple[torch.Tensor, AthenaInfo]:
    """Quantize ``W`` (rows, columns) given ``H`` (columns, columns); returns ``(Q, info)``.

    ``Q`` has ``W``'s shape, dtype and device; fp32 inside. The lazy block is ``blocksize``
    rounded up to a multiple of ``group_size``. Deterministic.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    _check(W, H, fmt, group_size, codebook, kmeans_iters, blocksize, percdamp, lowrank_rank)
    dtype = W.dtype
    W0 = W.detach().to(torch.float32)
    W, H = W0.clone(), H.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = ScaleGroups(fmt, W, static=False)
    Hinv, frac, damp, retries = damped_inverse_factor(H, percdamp, max_retries)
    bs = -(-blocksize // group_size) * group_size
    Q, loss = _sweep(W, Hinv, groups, group_size, bs, codebook, kmeans_iters)
    bits = _codes_bits(fmt, W.shape, group_size, codebook)
    if lowrank_rank:
        Q = Q + lowrank_correction(W0 - Q, H, lowrank_rank, frac * torch.diag(H).mean())
        bits += 16 * lowrank_rank * sum(W.shape)
    info = AthenaInfo(frac, damp, retries, loss, int(dead.sum()), group_size, codebook,
                      lowrank_rank, bits)
    return Q.to(dtype), info


def _sweep(W, Hinv, groups: ScaleGroups, g: int, blocksize: int, codebook: str, iters: int):
    """Groups of ``g`` columns in turn; OBS update of the later columns after each group."""
    rows, columns = W.shape
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = Hinv[i1:i2, i1:i2]
        for a in range(0, i2 - i1, g):
            b = min(a + g, i2 - i1)
            if codebook == "uniform":
                current = current_values(W, W1, Err1, Hinv, i1, a)
                QB = _uniform(W1[:, a:b], groups, i1 + a, current)
            else:
                QB = kmeans_codebook(W1[:, a:b], 1.0 / torch.diag(U1)[a:b].square(),
                                     2**groups.fmt.element_bits, iters)
            Q[:, i1 + a:i1 + b] = QB
            E = W1[:, a:b] - QB
            if b - a == 1:  # a 1x1 triangular solve is a division (written as GPTQ's Eq. 3)
                Err = E / U1[a, a]
                W1[:, a:] -= Err * U1[a, a:].unsqueeze(0)
            else:  # the multi-column OBS update in the factor's coordinates
                Err = torch.linalg.solve_triangular(U1[a:b, a:b], E, upper=True, left=False)
                W1[:, b:] -= Err @ U1[a:b, b:]
            Err1[:, a:b] = Err
        loss += Err1.double().square().sum() / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the later columns
    return Q, float(loss)


def _uniform(WB: torch.Tensor, groups: ScaleGroups, start: int, current) -> torch.Tensor:
    """The group's columns on the format's grid; each run of columns sharing a scale group is
    rounded with that group's parameters (fitted when its first column is reached)."""
    out = torch.empty_like(WB)
    c = 0
    while c < WB.shape[1]:
        k = groups.group_at[start + c]
        e = c + 1
        while e < WB.shape[1] and groups.group_at[start + e] == k:
            e += 1
        p = groups.params(start + c, current)
        out[:, c:e] = groups.fmt.quantize_with(WB[:, c:e], p)
        c = e
    return out


def kmeans_codebook(WB: torch.Tensor, weight: torch.Tensor, levels: int,
                    iters: int) -> torch.Tensor:
    """Each row of ``WB`` (rows, g) rounded to its own ``levels``-point codebook: weighted Lloyd
    iterations (column weights ``weight``) from an even grid over the row's range; the levels
    are stored as fp16, so the final assignment uses fp16 levels.

    Example:
        >>> x = torch.tensor([[0.0, 0.1, 1.0, 1.1]])
        >>> kmeans_codebook(x, torch.ones(4), 2, 5)
        tensor([[0.0500, 0.0500, 1.0498, 1.0498]])
    """
    lo, hi = WB.amin(dim=1, keepdim=True), WB.amax(dim=1, keepdim=True)
    steps = torch.linspace(0, 1, levels, device=WB.device)
    C = lo + (hi - lo) * steps  # (rows, levels)
    w = weight.to(WB.dtype).unsqueeze(0).expand_as(WB)
    for _ in range(iters):
        assign = (WB.unsqueeze(-1) - C.unsqueeze(1)).abs().argmin(dim=-1)  # (rows, g)
        onehot = torch.nn.functional.one_hot(assign, levels).to(WB.dtype) * w.unsqueeze(-1)
        mass = onehot.sum(dim=1)
        total = (onehot * WB.unsqueeze(-1)).sum(dim=1)
        C = torch.where(mass > 0, total / mass.clamp_min(1e-30), C)  # an empty level stays
    C = C.to(torch.float16).to(WB.dtype)
    assign = (WB.unsqueeze(-1) - C.unsqueeze(1)).abs().argmin(dim=-1)
    return torch.gather(C, 1, assign)


def lowrank_correction(R: torch.Tensor, H: torch.Tensor, rank: int, damp) -> torch.Tensor:
    """``A B`` of rank ``rank`` minimising ``tr((R - AB) H (R - AB)^T)``; fp16 factors."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H.double() + float(damp) * eye.double())
    U, S, Vh = torch.linalg.svd(R.double() @ L, full_matrices=False)
    A = (U[:, :rank] * S[:rank]).to(torch.float16)
    # B = Vh_r L^-1, i.e. solve B L = Vh_r
    B = torch.linalg.solve_triangular(L, Vh[:rank], upper=False, left=False).to(torch.float16)
    return (A.to(torch.float32) @ B.to(torch.float32)).to(R.dtype)


def _codes_bits(fmt: Format, shape, g: int, codebook: str) -> int:
    """Stored bits of the quantized matrix: the format's, or codes + fp16 levels per group row."""
    rows, columns = shape
    if codebook == "uniform":
        return fmt.storage_bits(tuple(shape))
    return rows * columns * fmt.element_bits + rows * -(-columns // g) * 2**fmt.element_bits * 16


def _check(W, H, fmt, group_size, codebook, kmeans_iters, blocksize, percdamp, rank) -> None:
    if W.ndim != 2 or W.numel() == 0 or not W.is_floating_point():
        raise ValueError(f"W must be a non-empty floating (rows, columns) matrix, got "
                         f"{W.dtype} {tuple(W.shape)}")
    if tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"H must be {(W.shape[1], W.shape[1])}, got {tuple(H.shape)}")
    for ok, msg in _setting_checks(fmt, group_size, codebook, kmeans_iters, blocksize,
                                   percdamp, rank):
        if not ok:
            raise ValueError(msg)
    if rank > min(W.shape):
        raise ValueError(f"lowrank_rank={rank} exceeds min(rows, columns)={min(W.shape)}")
    if not bool(torch.isfinite(H).all()) or not bool(torch.isfinite(W).all()):
        raise ValueError("W and H must be finite (found inf or NaN)")


def _setting_checks(fmt, group_size, codebook, kmeans_iters, blocksize, percdamp, rank):
    return [
        (isinstance(group_size, int) and group_size >= 1,
         f"group_size={group_size!r}: allowed an integer >= 1"),
        (codebook in CODEBOOKS, f"codebook={codebook!r}: allowed {', '.join(CODEBOOKS)}"),
        (codebook != "kmeans" or fmt.family not in ("baseline",),
         f"codebook=kmeans needs a quantized format for its bit width, got {fmt.name}"),
        (codebook != "kmeans" or group_size >= 2**fmt.element_bits,
         f"codebook=kmeans with {2**fmt.element_bits} levels needs group_size >= "
         f"{2**fmt.element_bits} (else the codebook stores the weights), got {group_size}"),
        (isinstance(kmeans_iters, int) and kmeans_iters >= 0,
         f"kmeans_iters={kmeans_iters!r}: allowed an integer >= 0"),
        (isinstance(blocksize, int) and blocksize >= 1,
         f"blocksize={blocksize!r}: allowed an integer >= 1"),
        (percdamp > 0, f"percdamp={percdamp!r}: allowed a number > 0"),
        (isinstance(rank, int) and rank >= 0, f"lowrank_rank={rank!r}: allowed an integer >= 0"),
    ]


# ---- the method ------------------------------------------------------------------------------
@dataclass
class AthenaConfig(MethodConfig):
    """Athena into ``format``: grouped OBS updates, uniform grid or k-means codebooks.

    Example:
        >>> cfg = AthenaConfig(format="int3_g32")
        >>> cfg.group_size, cfg.codebook, cfg.lowrank_rank
        (32, 'uniform', 0)
    """

    needs_calibration: ClassVar[bool] = True
    not_in_key: ClassVar[tuple[str, ...]] = ("batch_size", "device", "offload")

    name: str = "athena"
    format: str = "int3_g32"
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    allow_padding: bool = True
    group_size: int = 32  # columns quantized together before the OBS update
    codebook: str = "uniform"  # uniform (the format's grid) | kmeans (2**bits levels per row)
    kmeans_iters: int = 10  # Lloyd iterations per group (kmeans)
    lowrank_rank: int = 0  # rank of the fp16 correction of the residual (0: off)
    percdamp: float = 0.01  # lambda = percdamp * mean(diag H)
    blocksize: int = 128  # columns per lazy batch update (rounded up to group_size)
    true_sequential: bool = True  # re-collect inputs after each input group
    max_damp_retries: int = 3
    batch_size: int = 8  # calibration sequences per forward pass
    device: str = "auto"
    offload: bool = False  # keep calibration activations on the CPU between blocks

    def __post_init__(self) -> None:
        fmt = parse_format(self.format)
        checks = _setting_checks(fmt, self.group_size, self.codebook, self.kmeans_iters,
                                 self.blocksize, self.percdamp, self.lowrank_rank)
        checks += [(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
                   (self.max_damp_retries >= 0, "max_damp_retries must be >= 0"),
                   (not (self.targets.head or self.targets.embeddings),
                    "athena quantizes the decoder blocks' linears only; set targets.head=false "
                    "and targets.embeddings=false")]
        require(checks, prefix="method.")

    def settings(self) -> dict[str, Any]:
        keys = ("group_size", "codebook", "kmeans_iters", "lowrank_rank", "percdamp",
                "blocksize", "true_sequential", "max_damp_retries", "batch_size", "device",
                "offload")
        return {k: getattr(self, k) for k in keys}


@register_method("athena", AthenaConfig)
def quantize_athena(model: nn.Module, cfg: AthenaConfig, ctx: QuantContext) -> QuantReport:
    """Quantize the target linears of ``model`` in place with Athena, block by block."""
    from ptqscale.methods.capture import WalkPlan, routed_tokens, rtn_fallback, walk_blocks
    from ptqscale.models import get_anatomy, resolve_device

    fmt = get_format(cfg.format)
    ids = calibration_ids(ctx, "athena")
    device = resolve_device(cfg.device, "method.device")
    plan = WalkPlan(device, torch.device("cpu") if cfg.offload else device, cfg.batch_size,
                    False, cfg.true_sequential, ctx.progress, f"athena {cfg.format}")
    anat = get_anatomy(model)
    selected = select_targets(model, anat, cfg.targets)
    report = QuantReport(method="athena", format=fmt.name)

    def quantize_group(names: list[str], H: torch.Tensor | None, tokens: int, status: str) -> None:
        if H is None:  # an MoE expert no calibration token reached: RTN, recorded
            entries = rtn_fallback([(n, selected[n]) for n in names], fmt)
            for e in entries:
                e.update(storage_bits=fmt.storage_bits(tuple(e["shape"])),
                         retries=0, out_err=0.0, out_err_rtn=0.0)
            report.layers.extend(entries)
            return
        for name in names:
            report.layers.append(_quantize_layer(name, selected[name], H, fmt, cfg))

    was_training = model.training
    model.eval()
    try:
        walk_blocks(model, anat, selected, ids, plan, quantize_group)
    finally:
        model.train(was_training)
    layers = report.layers
    numel = sum(layer["numel"] for layer in layers)
    report.extra = {
        "athena": {**cfg.settings(), "device": str(device)},
        "calibration": {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
                        "hash": ctx.calibration_hash or hash_ids(ids)},
        # what the quantized weights take, codebooks and low-rank factors included
        "bits_per_weight": (sum(layer["storage_bits"] for layer in layers) / numel
                            if numel else None),
        "damp_retries": sum(layer["retries"] for layer in layers),
        "out_err": math.fsum(layer["out_err"] for layer in layers),
        "out_err_rtn": math.fsum(layer["out_err_rtn"] for layer in layers),
    }
    moe = routed_tokens(anat, layers)
    if moe is not None:
        report.extra["moe"] = moe
    return report


@torch.no_grad()
def _quantize_layer(name: str, module: nn.Module, H: torch.Tensor, fmt: Format,
                    cfg: AthenaConfig) -> dict:
    W = module.weight.data
    H = H.to(W.device)
    Q, info = athena_quantize(W, H, fmt, cfg.group_size, cfg.codebook, cfg.kmeans_iters,
                              cfg.blocksize, cfg.percdamp, cfg.lowrank_rank, cfg.max_damp_retries)
    entry = layer_stats(name, W, Q, fmt.padding_needed(W.shape[1]))
    entry.update(info.to_dict())
    entry.update(out_err=output_energy(W - Q, H),
                 out_err_rtn=output_energy(W - fmt.fake_quantize(W), H))
    module.weight.data.copy_(Q)
    return entry
