"""Metric ``model_bytes``: bytes of the deployed model.

Quantized weights at their effective bits per weight (scales included), every other
parameter (embeddings, norms, an untied head) at 16 bits: the deployment baseline,
whatever dtype the model was loaded in for measuring.
"""

from __future__ import annotations

from ptqscale.metrics.perplexity import PROTOCOL_VERSION
from ptqscale.metrics.registry import MetricContext, register_metric

# Bytes per parameter that a method leaves unquantized (the 16-bit baseline).
UNQUANTIZED_BYTES = 2


@register_metric("model_bytes", higher_is_better=False, version=PROTOCOL_VERSION,
                 needs=("report",))
def measure_model_bytes(ctx: MetricContext) -> dict:
    # a method that stores more than the format's bits (codebooks, low-rank factors)
    # reports its own effective bits per weight
    bits = ctx.report.extra.get("bits_per_weight") or ctx.fmt.bits_per_weight
    return {"model_bytes": deployed_bytes(ctx.params["total"], ctx.report.quantized_numel, bits)}


def deployed_bytes(total_params: int, quantized_params: int, bits_per_weight: float) -> int:
    """Bytes of the deployed model: quantized weights at their effective bits, the rest at 16.

    >>> deployed_bytes(1000, 800, 4.0)     # 800 * 4 / 8 + 200 * 2
    800
    """
    quantized = quantized_params * bits_per_weight / 8
    return int(round(quantized + (total_params - quantized_params) * UNQUANTIZED_BYTES))
