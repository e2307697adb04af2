"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into the weights.

For each group of linears that read the same normalized input (q/k/v after the attention
norm, gate/up after the MLP norm), with per-channel maxima over the calibration tokens
(Sec. 4, Eq. 4)::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (max|W_j| over all rows of the group)

the norm's weight (and bias) is divided by ``s`` and the group's weight columns multiplied by
``s`` (``scaling.py`` finds the norm family-agnostically and checks the fold numerically), so
the full-precision function is unchanged; then the weights are rounded to ``format`` (RTN) and
the inputs of every target are fake-quantized as ``activations`` says (per-token by default:
the paper's O3 setting). Groups not fed directly by a foldable norm (o_proj, down_proj) are
not smoothed, as in the reference ``smooth_lm``; the record lists what was smoothed.

Example::

    >>> cfg = SmoothQuantConfig(format="int8")
    >>> cfg.alpha, cfg.activations.granularity
    (0.5, 'per_token')
    >>> report = quantize(model, cfg, QuantContext(calibration=ids))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ptqscale.errors import require
from ptqscale.formats import get_format
from ptqscale.methods.activations import ActQuantConfig, channel_absmax
from ptqscale.methods.base import (
    MethodConfig,
    QuantContext,
    QuantReport,
    TargetsConfig,
    calibration_ids,
    parse_format,
    register_method,
    select_targets,
)
from ptqscale.methods.rtn import round_weight_
from ptqscale.methods.scaling import NotReached, find_fold_target, scale_group_


@dataclass
class SmoothQuantConfig(MethodConfig):
    """SmoothQuant with migration strength ``alpha``, RTN weights into ``format``, and the
    activation quantization ``activations`` (required).

    Example:
        >>> SmoothQuantConfig(alpha=0.8).alpha
        0.8
    """

    needs_calibration: ClassVar[bool] = True
    name: str = "smoothquant"
    format: str = "int8"
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    allow_padding: bool = True
    activations: ActQuantConfig | None = field(default_factory=ActQuantConfig)
    alpha: float = 0.5  # migration strength: 0 = no migration to the weights, 1 = all
    min_scale: float = 1e-5  # floor of max|W_j| and of s_j (the reference's clamp)
    batch_size: int = 8  # calibration sequences per forward pass

    def __post_init__(self) -> None:
        parse_format(self.format)
        checks = [
            (0.0 <= self.alpha <= 1.0, f"method.alpha={self.alpha} must be in [0, 1]"),
            (self.min_scale > 0, f"method.min_scale={self.min_scale} must be > 0"),
            (self.batch_size >= 1, f"method.batch_size={self.batch_size} must be >= 1"),
            (self.activations is not None, "smoothquant quantizes activations: set "
             "method.activations (format, granularity, ...); for weights only use rtn or awq"),
        ]
        require(checks)


def smoothing_factors(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                      min_scale: float = 1e-5) -> torch.Tensor:
    """Eq. 4: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``, max over every row of ``weights``.

    Example:
        >>> smoothing_factors(torch.tensor([4.0, 1.0]), [torch.ones(3, 2)], 0.5)
        tensor([2., 1.])
    """
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    w_max = w_max.clamp(min=min_scale)
    return (act_max.float().pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=min_scale)


@torch.no_grad()
def smooth_(model: nn.Module, calibration: torch.Tensor, alpha: float, *,
            targets: TargetsConfig | None = None, batch_size: int = 8,
            min_scale: float = 1e-5) -> list[dict[str, Any]]:
    """Apply SmoothQuant's scaling in place (no quantization); one entry per group.

    The full-precision function is unchanged (to float rounding); entries say which norm
    absorbed ``1/s`` or why a group was left alone.
    """
    from ptqscale.methods.capture import capture_block_inputs, input_groups
    from ptqscale.models import get_anatomy

    anat = get_anatomy(model)
    selected = select_targets(model, anat, targets or TargetsConfig())
    probe = capture_block_inputs(model, anat.blocks[0], calibration[:1], 1,
                                 next(anat.blocks[0].parameters()).device)
    groups = input_groups(anat.blocks[0], anat.block_order, probe)
    act_max = channel_absmax(model, selected, calibration, batch_size)
    entries = []
    for i, block in enumerate(anat.blocks):
        prefix = f"{anat.block_prefix}.{i}."
        batch = next(probe.batches(next(block.parameters()).device))
        for group in groups:
            names = [r for r in group if prefix + r in selected]
            if names:
                entries.append(_smooth_group(block, prefix, names, anat.block_order, batch,
                                             act_max, alpha, min_scale))
    return entries


def _smooth_group(block, prefix, names, order, batch, act_max, alpha, min_scale) -> dict:
    entry: dict[str, Any] = {"group": [prefix + n for n in names]}
    try:
        target = find_fold_target(block, names, order, batch)
    except NotReached:  # an MoE expert the probe sequence routed no token to
        return {**entry, "smoothed": False, "reason": "the probe batch reached no input of it"}
    if target is None or target.kind != "norm":
        return {**entry, "smoothed": False, "reason": "no foldable norm feeds this input"}
    weights = [block.get_submodule(n).weight for n in names]
    s = smoothing_factors(act_max[prefix + names[0]], weights, alpha, min_scale)
    scale_group_(block, names, s, target)
    return {**entry, "smoothed": True, "folded_into": prefix + target.name,
            "s_max": float(s.max()), "s_min": float(s.min())}


@register_method("smoothquant", SmoothQuantConfig)
def quantize_smoothquant(model: nn.Module, cfg: SmoothQuantConfig,
                         ctx: QuantContext) -> QuantReport:
    """Smooth, round the weights (RTN); ``methods.quantize`` then hooks the activations."""
    from ptqscale.models import get_anatomy

    ids = calibration_ids(ctx, "smoothquant")
    fmt = get_format(cfg.format)
    was_training = model.training
    model.eval()
    try:
        groups = smooth_(model, ids, cfg.alpha, targets=cfg.targets,
                         batch_size=cfg.batch_size, min_scale=cfg.min_scale)
    finally:
        model.train(was_training)
    report = QuantReport(method="smoothquant", format=fmt.name)
    for name, module in select_targets(model, get_anatomy(model), cfg.targets).items():
        report.layers.append(round_weight_(name, module, fmt))
    report.extra["smoothquant"] = {"alpha": cfg.alpha, "groups": groups,
                                   "smoothed_groups": sum(g["smoothed"] for g in groups)}
    return report
