"""Measurements of a model: perplexity, the loss landscape, and the metric registry.

Example::

    >>> from ptqscale.metrics import EvalConfig, measure_perplexity
    >>> res = measure_perplexity(model, stream, EvalConfig(preset="gptq", seqlen=512))  # doctest: +SKIP
    >>> res.to_dict()["protocol_version"]  # doctest: +SKIP
    1

How to add a metric: one module ``<name>.py`` here with a function registered by
``@register_metric("<name>", higher_is_better=..., version=1, needs=(...))`` that returns
``{field: value}`` (the contract is in metrics/registry.py). Every module of this package is
imported with it (discovery), so the metric is then known to ``metrics: [...]`` in a job
config, lands in ``record["metrics"]`` and in the analysis frame: no list to edit. Add a
test against an independent reference. A change to what a metric measures bumps its version.
"""

import importlib
import pkgutil

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
from ptqscale.metrics.registry import (
    DEFAULT_METRICS,
    METRICS,
    Metric,
    MetricContext,
    get_metric,
    register_metric,
    resolve_metrics,
)


def _discover() -> None:
    """Import every module of this package; each metric module registers itself by decorator."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_discover()

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "Metric",
    "MetricContext",
    "get_metric",
    "register_metric",
    "resolve_metrics",
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
