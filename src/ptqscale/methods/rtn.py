"""The full-precision baseline (``none``) and round-to-nearest (``rtn``).

RTN and the 16-bit baseline go through the same path as every other method: select the
targets, replace each weight by its quantized value, report per-layer statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ptqscale.formats import get_format
from ptqscale.methods.base import (
    MethodConfig,
    QuantContext,
    QuantReport,
    layer_stats,
    register_method,
    select_targets,
)


@dataclass
class NoneConfig(MethodConfig):
    """Leave the model as loaded: the full-precision reference."""

    name: str = "none"
    format: str = "bf16"


@dataclass
class RTNConfig(MethodConfig):
    """Round every target weight to the nearest value of ``format`` (no calibration)."""

    name: str = "rtn"
    format: str = "int4_g128"


@register_method("none", NoneConfig)
def quantize_none(model: nn.Module, cfg: NoneConfig, ctx: QuantContext) -> QuantReport:
    return QuantReport(method="none", format=cfg.format)


@register_method("rtn", RTNConfig)
def quantize_rtn(model: nn.Module, cfg: RTNConfig, ctx: QuantContext) -> QuantReport:
    from ptqscale.models import get_anatomy, placement_of

    fmt = get_format(cfg.format)
    report = QuantReport(method="rtn", format=fmt.name)
    placement = placement_of(model)
    # streamed: each weight visits the execution device to be rounded, one at a time
    device = placement.device if placement.streamed else None
    for name, module in select_targets(model, get_anatomy(model), cfg.targets).items():
        report.layers.append(round_weight_(name, module, fmt, device))
    return report


@torch.no_grad()
def round_weight_(name: str, module: nn.Module, fmt, device: torch.device | None = None) -> dict:
    """Replace ``module.weight`` by ``fmt.fake_quantize`` of it (computed on ``device``, default
    where the weight is); return its layer stats."""
    from ptqscale.models.mapped import spill_changed

    weight = module.weight
    w = weight.data if device is None else weight.data.to(device)
    quantized = fmt.fake_quantize(w)
    stats = layer_stats(name, w, quantized, fmt.padding_needed(weight.shape[-1]))
    weight.data.copy_(quantized)
    spill_changed(module)   # a streamed model with a spill folder: to disk (models/mapped.py)
    return stats
