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


def describe_model(cfg: ModelConfig, hub_cache_only: bool = False) -> ModelSkeleton | None:
    """Validate ``cfg`` and return the model's skeleton (reads only the config).

    ``hub_cache_only`` (planning): a hub model whose config is not in the local hub cache is
    not looked up (no network, no retries); the answer is None, "needs download".
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ptqscale.models.anatomy import get_anatomy
    from ptqscale.models.loading import _load_config, _usable_context, replace_conv1d, split_experts

    source = validate_model_config(cfg)
    if hub_cache_only and source.kind == "hub" and not cfg.stand_in:
        try:
            AutoConfig.from_pretrained(source.path, revision=cfg.revision, local_files_only=True,
                                       trust_remote_code=cfg.trust_remote_code)
        except OSError:
            return None
    config = _load_config(cfg, source)
    context = _usable_context(config, cfg.max_seqlen)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    replace_conv1d(model)
    split_experts(model)
    anatomy = get_anatomy(model)
    shapes = {name: (m.out_features, m.in_features) for name, m in anatomy.targets.items()}
    return ModelSkeleton(anatomy.architecture, context, shapes)
