"""Metric ``weight_sqnr``: global weight SQNR of the quantized linear weights, in dB.

Field ``weight_sqnr_db`` = 10*log10(sum ||W||^2 / sum ||W - Q(W)||^2) over the quantized
layers (the per-layer values are in ``record["layers"]``); null where nothing was
quantized or the quantization is exact (JSON has no +inf).
"""

from __future__ import annotations

from ptqscale.metrics.perplexity import PROTOCOL_VERSION
from ptqscale.metrics.registry import MetricContext, register_metric


@register_metric("weight_sqnr", higher_is_better=True, version=PROTOCOL_VERSION,
                 needs=("report",), headline="weight_sqnr_db")
def measure_weight_sqnr(ctx: MetricContext) -> dict:
    """The method's report holds the per-layer signal and noise energies."""
    return {"weight_sqnr_db": ctx.report.weight_sqnr_db}
