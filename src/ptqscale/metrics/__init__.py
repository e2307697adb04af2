"""Measurements of a model: perplexity (and, from other modules, the loss landscape).

Example::

    >>> from ptqscale.metrics import EvalConfig, measure_perplexity
    >>> res = measure_perplexity(model, stream, EvalConfig(preset="gptq", seqlen=512))  # doctest: +SKIP
    >>> res.to_dict()["protocol_version"]  # doctest: +SKIP
    1

How to add a metric: one module per metric with a ``<Name>Config`` dataclass (validated in
``__post_init__``), a ``measure_<name>(model, ..., cfg)`` verb returning a result dataclass with
``to_dict()`` and its protocol version, a test against an independent reference, and an export
here. A change to what a metric measures bumps ``PROTOCOL_VERSION``.
"""

from ptqscale.metrics.landscape import (
    LANDSCAPE_PROTOCOL,
    LandscapeConfig,
    measure_directional_profile,
    measure_hessian,
    measure_landscape,
    measure_noise_response,
    noise_equivalent_dnll,
)
from ptqscale.metrics.perplexity import (
    PRESETS,
    PROTOCOL_VERSION,
    EvalConfig,
    PerplexityResult,
    measure_perplexity,
    model_context,
    validate_eval_config,
    window_nll,
    window_plan,
)

__all__ = [
    "LANDSCAPE_PROTOCOL",
    "LandscapeConfig",
    "measure_directional_profile",
    "measure_hessian",
    "measure_landscape",
    "measure_noise_response",
    "noise_equivalent_dnll",
    "PRESETS",
    "PROTOCOL_VERSION",
    "EvalConfig",
    "PerplexityResult",
    "measure_perplexity",
    "model_context",
    "validate_eval_config",
    "window_nll",
    "window_plan",
]
