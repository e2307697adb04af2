"""Loading causal LMs and their family-agnostic anatomy.

Example::

    >>> from ptqscale.models import ModelConfig, load_model, get_anatomy, count_parameters
    >>> cfg = ModelConfig(name="stories260k", max_seqlen=512,
    ...                   path="../shared/data/models/stories260K/stories260K.gguf")
    >>> model, tokenizer = load_model(cfg)              # doctest: +SKIP
    >>> anat = get_anatomy(model)                       # doctest: +SKIP
    >>> len(anat.targets), anat.context_length          # doctest: +SKIP
    (35, 512)

Placement: ``ModelConfig.placement`` holds a model in one piece, streamed (weights on the
CPU, one decoder block at a time on the device; ``streaming.py``) or spread (whole blocks on
several GPUs; ``spread.py``), under an optional ``max_gpu_memory`` cap; ``walk_logits`` is the block-by-block forward every stage can use.
Weights on the CPU in the checkpoint's dtype stay memory-mapped from its safetensors
(``mapped.py``; reuse between jobs undoes a job's writes without copies, ``reuse.py``).

How to add a family: nothing is written per family. Build a tiny config of it in
``tests/models/tiny_models.py`` (hidden 32-64, 2 layers), state the target names the anatomy
must find in ``tests/models/test_anatomy.py``, and add its ``model_type`` to ``SUPPORTED_ARCHITECTURES`` in ``anatomy.py``. If it uses a
Linear-like layer that is not ``nn.Linear`` (as GPT-2's ``Conv1D``), convert it in
``loading.py`` the way ``replace_conv1d`` does (fused MoE experts: ``experts.py``).
"""

from ptqscale.models.anatomy import SUPPORTED_ARCHITECTURES, Anatomy, count_parameters, get_anatomy
from ptqscale.models.config import (
    DTYPES,
    PLACEMENTS,
    ModelConfig,
    ModelSource,
    validate_model_config,
)
from ptqscale.models.errors import (
    ModelNotFoundError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
)
from ptqscale.models.experts import MOE_ARCHITECTURES, split_experts
from ptqscale.models.loading import (
    check_finite,
    load_gguf_tokenizer,
    load_model,
    place_model,
    replace_conv1d,
    resolve_device,
)
from ptqscale.models.streaming import (
    GPUMemoryBudgetError,
    Placement,
    placement_of,
    walk_logits,
)

__all__ = [
    "DTYPES",
    "MOE_ARCHITECTURES",
    "PLACEMENTS",
    "SUPPORTED_ARCHITECTURES",
    "Anatomy",
    "GPUMemoryBudgetError",
    "ModelConfig",
    "ModelNotFoundError",
    "ModelSource",
    "Placement",
    "UnsafeCheckpointError",
    "UnsupportedArchitectureError",
    "check_finite",
    "count_parameters",
    "get_anatomy",
    "load_gguf_tokenizer",
    "load_model",
    "place_model",
    "placement_of",
    "replace_conv1d",
    "resolve_device",
    "split_experts",
    "validate_model_config",
    "walk_logits",
]
