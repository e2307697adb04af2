"""AWQ (Lin et al., MLSys 2024): activation-aware per-channel weight scaling, weight-only.

For each group of linears sharing an input ``X`` (q/k/v, o, gate/up, down), with
``m_j = mean_i |X_ij|`` over the calibration tokens (Sec. 3.2)::

    s(a) = m^a / sqrt(max(m^a) * min(m^a)),   a in {0, 1/n, ..., (n-1)/n}   (n = grid = 20)
    a*   = argmin_a  sum_l || X W_l^T - (X / s) Q(W_l s)^T ||^2

``a = 0`` is RTN, so the chosen scale never does worse than RTN on this objective. The error
is computed exactly from ``H = 2/n X^T X`` (``capture.py``'s accumulator):
``||X D^T||^2 / n = tr(D H D^T) / 2`` with ``D = W - Q(W s) / s``. Then ``W *= s`` and ``X / s``
is folded into the op that produces ``X`` (``scaling.py``: the norm before q/k/v and gate/up;
``v_proj`` before ``o_proj`` without grouped-query attention; ``up_proj`` before
``down_proj``); a group with nothing to fold into is left unscaled (``unfoldable: skip``, the
reference's choice) or keeps ``x / s`` as an explicit pre-hook (``unfoldable: explicit``).

Clip search (optional, Sec. 3.3 of the reference code ``auto_clip``): per output row and scale
group of the format, the clamp ``max|w| * (1 - i/n)`` (``i < max_shrink * n``) that minimises
that group's own output error ``d^T H_gg d / 2``; q/k are excluded by default as in the
reference. Scales and clips come from full-precision block inputs; each block's weights are
rounded to ``format`` after its outputs (the next block's inputs) are computed, as the
reference (scaled and clipped, not yet quantized, model) does.

Example::

    >>> cfg = AWQConfig(format="int4_g128")
    >>> cfg.grid, cfg.clip_search, cfg.unfoldable
    (20, True, 'skip')
    >>> report = quantize(model, cfg, QuantContext(calibration=ids))  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ptqscale import console
from ptqscale.errors import require
from ptqscale.formats import Format, get_format
from ptqscale.methods.base import (
    METHOD_DEVICE,
    MethodConfig,
    QuantContext,
    QuantReport,
    TargetsConfig,
    calibration_ids,
    layer_stats,
    parse_format,
    register_method,
    select_targets,
)
from ptqscale.methods.capture import (
    BlockInputs,
    HessianAccumulator,
    block_device,
    capture_block_inputs,
    input_groups,
    rtn_fallback,
    run_block,
)
from ptqscale.methods.scaling import NotReached, find_fold_target, scale_group_
from ptqscale.models import resolve_device
from ptqscale.models.streaming import compute_on


@dataclass
class AWQConfig(MethodConfig):
    """AWQ into any weight ``format``; the reference's defaults (mit-han-lab/llm-awq).

    Example:
        >>> AWQConfig(format="mxint4_b32", clip_search=False).max_shrink
        0.5
    """

    needs_calibration: ClassVar[bool] = True
    not_in_key: ClassVar[tuple[str, ...]] = ("batch_size", "device")
    name: str = "awq"
    format: str = "int4_g128"
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    allow_padding: bool = True
    grid: int = 20  # exponents a = 0, 1/grid, ..., (grid-1)/grid
    unfoldable: str = "skip"  # a group with no op to fold 1/s into: skip | explicit
    clip_search: bool = True
    clip_grid: int = 20  # clamp max|w| * (1 - i/clip_grid)
    max_shrink: float = 0.5  # i < max_shrink * clip_grid
    clip_exclude: list[str] = field(default_factory=lambda: ["*.q_proj", "*.k_proj"])
    batch_size: int = 8  # calibration sequences per forward pass
    device: str = "auto"  # where blocks compute: auto | cpu | cuda[:N]

    def __post_init__(self) -> None:
        fmt = parse_format(self.format)
        checks = [
            (self.grid >= 1, f"method.grid={self.grid} must be >= 1"),
            (self.unfoldable in ("skip", "explicit"),
             f"method.unfoldable={self.unfoldable!r}: allowed skip, explicit"),
            (self.clip_grid >= 1, f"method.clip_grid={self.clip_grid} must be >= 1"),
            (0.0 < self.max_shrink < 1.0, f"method.max_shrink={self.max_shrink} must be in "
             "(0, 1)"),
            (self.batch_size >= 1, f"method.batch_size={self.batch_size} must be >= 1"),
            (bool(METHOD_DEVICE.match(self.device)),
             f"method.device={self.device!r}: allowed auto, cpu, cuda, cuda:N"),
            (not (self.clip_search and fmt.per_tensor), f"method.clip_search=true needs "
             f"per-row or per-group scales; {fmt.name} has one scale per tensor"),
            (not (self.targets.head or self.targets.embeddings),
             "awq quantizes the decoder blocks' linears only; set targets.head=false and "
             "targets.embeddings=false"),
        ]
        require(checks)


# ---- the algorithm on one group ---------------------------------------------------------------
def output_error(W: torch.Tensor, Weff: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Weff) H (W - Weff)^T) / 2`` = mean squared output error per token (fp64)."""
    D = (W - Weff).double()
    return float(((D @ H.double()) * D).sum() / 2)


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], x_mean: torch.Tensor, H: torch.Tensor,
                 fmt: Format, grid: int) -> tuple[torch.Tensor, float, list[float]]:
    """``(s, a*, errors per a)``: the grid search of Sec. 3.2 on one group's weights."""
    x_mean = x_mean.float().clamp(min=1e-4)  # the reference's floor: no zero scale
    errors = []
    best = (None, 0.0, float("inf"))
    for k in range(grid):
        a = k / grid
        s = x_mean.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(output_error(W, fmt.fake_quantize(W * s) / s, H) for W in weights)
        errors.append(err)
        if err < best[2]:
            best = (s, a, err)
    return best[0], best[1], errors


@torch.no_grad()
def search_clip(W: torch.Tensor, H: torch.Tensor, fmt: Format, clip_grid: int,
                max_shrink: float) -> tuple[torch.Tensor, float]:
    """``(clamped W, mean shrink)``: per (row, scale group) the clamp with least group error."""
    rows, cols = W.shape
    g = fmt.scale_group_size(cols) or cols  # per-channel formats: the whole row
    pad = (-cols) % g
    Wp = torch.nn.functional.pad(W.float(), (0, pad)).view(rows, -1, g)
    Hp = torch.nn.functional.pad(H.float(), (0, pad, 0, pad))
    k = Wp.shape[1]
    Hb = torch.stack([Hp[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(k)])  # H_gg
    wmax = Wp.abs().amax(-1, keepdim=True)
    best_err = torch.full((rows, k), float("inf"), device=W.device)
    best = Wp.clone()
    shrink = torch.zeros(rows, k, device=W.device)
    for i in range(int(max_shrink * clip_grid)):
        mv = wmax * (1 - i / clip_grid)
        Wc = torch.maximum(torch.minimum(Wp, mv), -mv)
        Q = fmt.fake_quantize(Wc.view(rows, -1)[:, :cols])
        D = torch.nn.functional.pad(Q - W.float(), (0, pad)).view(rows, k, g)
        err = torch.einsum("rkg,kgh,rkh->rk", D, Hb, D) / 2
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), Wc, best)
        shrink = torch.where(better, torch.full_like(shrink, i / clip_grid), shrink)
    return best.view(rows, -1)[:, :cols].to(W.dtype), float(shrink.mean())


# ---- the method ------------------------------------------------------------------------------
@register_method("awq", AWQConfig)
def quantize_awq(model: nn.Module, cfg: AWQConfig, ctx: QuantContext) -> QuantReport:
    """Scale (and clip) every group from full-precision block inputs; round block by block."""
    from ptqscale.models import get_anatomy

    ids = calibration_ids(ctx, "awq")
    fmt = get_format(cfg.format)
    device = resolve_device(cfg.device, "method.device")
    anat = get_anatomy(model)
    selected = select_targets(model, anat, cfg.targets)
    report = QuantReport(method="awq", format=fmt.name)
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, anat.blocks[0], ids, cfg.batch_size, device)
        b0 = anat.blocks[0]
        groups = input_groups(b0.to(block_device(model, b0, device)), anat.block_order, inputs)
        for i, block in enumerate(console.progress(anat.blocks, f"awq {fmt.name}", ctx.progress,
                                                   unit="block")):
            home = next(block.parameters()).device
            at = block_device(model, block, device)  # a spread model's block: its own GPU
            block.to(at)
            try:
                with compute_on(at):
                    inputs = _awq_block(block, f"{anat.block_prefix}.{i}.", groups,
                                        anat.block_order, selected, inputs, fmt, cfg, at, report)
            finally:
                block.to(home)
    finally:
        model.train(was_training)
    report.extra["awq"] = _summary(cfg, ctx, report.layers)
    return report


def _awq_block(block, prefix, groups, order, selected, inputs: BlockInputs, fmt, cfg, device,
               report) -> BlockInputs:
    wanted = [[r for r in g if prefix + r in selected] for g in groups]
    wanted = [g for g in wanted if g]
    stats = _group_stats(block, [g[0] for g in wanted], inputs, device)
    # an MoE expert no calibration token reached: nothing to search on; RTN, recorded
    unreached = [r for g in wanted if stats[g[0]][0] is None for r in g]
    wanted = [g for g in wanted if stats[g[0]][0] is not None]
    batch = next(inputs.batches(device))
    state = {r: _LayerState(block.get_submodule(r).weight.data.clone(), stats[g[0]][0])
             for g in wanted for r in g}
    for g in wanted:  # 1. scales (each group's search sees the earlier groups' folds)
        _scale_group(block, g, order, batch, stats[g[0]], fmt, cfg, state)
    for r, st in state.items():  # 2. clips, on W s against the Hessian of X / s
        excluded = any(fnmatch.fnmatchcase(prefix + r, p) for p in cfg.clip_exclude)
        if cfg.clip_search and not excluded:
            w = block.get_submodule(r).weight
            clipped, st.info["clip_shrink"] = search_clip(w.data, st.scaled_hessian(), fmt,
                                                          cfg.clip_grid, cfg.max_shrink)
            w.data.copy_(clipped)
    outputs = run_block(block, inputs, device, device)  # 3. next inputs: scaled, clipped
    for r, st in state.items():  # 4. round
        report.layers.append(st.round(prefix + r, block.get_submodule(r), fmt))
    for entry in rtn_fallback([(prefix + r, block.get_submodule(r)) for r in unreached], fmt):
        report.layers.append({**entry, "awq_ratio": None, "clip_shrink": None,
                              "out_err_awq": 0.0, "out_err_rtn": 0.0})
    return outputs


@dataclass
class _LayerState:
    """One linear during AWQ: its original weight and input Hessian, the column scale ``s``
    and the row divisor ``rho`` (a later group folded ``1/s`` into its rows)."""

    W: torch.Tensor
    H: torch.Tensor
    s: torch.Tensor | None = None
    rho: torch.Tensor | None = None
    info: dict = field(default_factory=lambda: {"awq_ratio": None, "clip_shrink": None})

    def scaled_hessian(self) -> torch.Tensor:
        if self.s is None:
            return self.H
        inv = 1.0 / self.s
        return self.H * inv.unsqueeze(0) * inv.unsqueeze(1)  # H of X / s

    def round(self, name: str, module: nn.Module, fmt: Format) -> dict:
        """Round in place; SQNR and output errors of the effective weight ``rho Q / s``
        (what multiplies the original input, in the original output space) vs the original."""
        Q = fmt.fake_quantize(module.weight.data)
        Weff = Q.float()
        if self.s is not None:
            Weff = Weff / self.s.unsqueeze(0)
        if self.rho is not None:
            Weff = Weff * self.rho.unsqueeze(1)
        W = self.W.float()
        stats = layer_stats(name, W, Weff, fmt.padding_needed(Q.shape[1]))
        stats.update(self.info, out_err_awq=output_error(W, Weff, self.H),
                     out_err_rtn=output_error(W, fmt.fake_quantize(W), self.H))
        module.weight.data.copy_(Q)
        return stats


def _scale_group(block, g, order, batch, stats, fmt, cfg, state: dict) -> None:
    H, x_mean = stats
    try:
        target = find_fold_target(block, g, order, batch)
    except NotReached:  # an MoE expert the probe batch routed no token to
        for r in g:
            state[r].info["scaling"] = "skipped: the probe batch reached no input of it"
        return
    if target is None and cfg.unfoldable == "skip":
        for r in g:
            state[r].info["scaling"] = "skipped: nothing to fold 1/s into"
        return
    weights = [block.get_submodule(r).weight.data.float() for r in g]
    s, a, _ = search_scale(weights, x_mean, H, fmt, cfg.grid)
    scale_group_(block, g, s, target)
    how = "explicit pre-hook x/s" if target is None else f"folded into {target.name}"
    for r in g:
        state[r].s = s
        state[r].info.update(awq_ratio=a, scaling=how)
    if target is not None and target.name in state:  # a linear of this block took 1/s
        st = state[target.name]
        st.rho = s if st.rho is None else st.rho * s


@torch.no_grad()
def _group_stats(block, firsts: list[str], inputs: BlockInputs, device) -> dict:
    """``{first: (H, mean|X_j|)}`` of each group's input over every batch (one block pass)."""
    acc = {n: HessianAccumulator(block.get_submodule(n).in_features, device) for n in firsts}
    abs_sum = {n: torch.zeros(block.get_submodule(n).in_features, device=device) for n in firsts}

    def hook(name):
        def fn(module, args):
            acc[name].add(args[0])
            abs_sum[name] += args[0].reshape(-1, args[0].shape[-1]).float().abs().sum(0)
        return fn

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in firsts]
    try:
        run_block(block, inputs, device, device)
    finally:
        for h in handles:
            h.remove()
    return {n: (acc[n].hessian(), abs_sum[n] / max(acc[n].tokens, 1)) for n in firsts}


def _summary(cfg: AWQConfig, ctx: QuantContext, layers: list[dict]) -> dict[str, Any]:
    ratios = [layer["awq_ratio"] for layer in layers if layer["awq_ratio"] is not None]
    return {
        "grid": cfg.grid, "unfoldable": cfg.unfoldable, "clip_search": cfg.clip_search,
        "clip_grid": cfg.clip_grid, "max_shrink": cfg.max_shrink,
        "clip_exclude": list(cfg.clip_exclude),
        "calibration": {"nsamples": int(ctx.calibration.shape[0]),
                        "seqlen": int(ctx.calibration.shape[1]), "hash": ctx.calibration_hash},
        "scaled_layers": len(ratios), "mean_ratio": sum(ratios) / len(ratios) if ratios else None,
        "out_err_awq": sum(layer["out_err_awq"] for layer in layers),
        "out_err_rtn": sum(layer["out_err_rtn"] for layer in layers),
    }
