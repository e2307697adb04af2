"""A model's shape without its weights: usable context and target shapes, for validation.

Built on the meta device from the checkpoint's config alone, so a sweep can refuse a
format whose block does not divide a layer, or a sequence length beyond the context,
before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptqscale.models.config import ModelConfig, validate_model_config


@dataclass(frozen=True)
class ModelSkeleton:
    architecture: str
    context: int
    target_shapes: dict[str, tuple[int, int]]   # full module name -> (out_features, in_features)


def describe_model(cfg: ModelConfig) -> ModelSkeleton:
    """Validate ``cfg`` and return the model's skeleton (reads only the config)."""
    from transformers import AutoModelForCausalLM

    from ptqscale.models.anatomy import get_anatomy
    from ptqscale.models.loading import _load_config, _usable_context, replace_conv1d

    source = validate_model_config(cfg)
    config = _load_config(cfg, source)
    context = _usable_context(config, cfg.max_seqlen)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    replace_conv1d(model)
    anatomy = get_anatomy(model)
    shapes = {name: (m.out_features, m.in_features) for name, m in anatomy.targets.items()}
    return ModelSkeleton(anatomy.architecture, context, shapes)
