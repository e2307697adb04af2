"""Metric ``nll``: the quantized model's NLL and perplexity, and their change from full precision.

Fields: ``nll`` (mean nats per scored token), ``perplexity`` = exp(nll), ``nll_sum``,
``tokens``, the full-precision ``nll_fp`` and ``perplexity_fp`` (measured once per model,
cached), ``dnll`` = nll - nll_fp, and their standard errors ``nll_se`` and ``dnll_se``
(windows as the independent draws, the dNLL one paired window by window:
``perplexity.window_se``; what a second corpus sample of the same size would move them by,
the floor under any difference a study can resolve). Protocol: DESIGN "Measured
quantities" (``eval`` presets in metrics/perplexity.py); its version is the global
``PROTOCOL_VERSION``. Its
pass over the quantized model hands each window's logits to the other metrics' taps
(``ctx.taps``, registry.py), e.g. ``fidelity``'s, which then needs no pass of its own.
"""

from __future__ import annotations

import math

from ptqscale import console
from ptqscale.errors import ImplausibleResultError
from ptqscale.metrics.perplexity import PROTOCOL_VERSION, measure_perplexity, window_se
from ptqscale.metrics.registry import MetricContext, register_metric


@register_metric("nll", higher_is_better=False, version=PROTOCOL_VERSION,
                 needs=("stream", "fp", "report"))
def measure_nll(ctx: MetricContext) -> dict:
    """NLL of the quantized model on the evaluation stream, next to the full-precision one."""
    if ctx.report.layers:
        with console.stage("quantized eval", ctx.timings, "eval"):
            quant = measure_perplexity(ctx.model, ctx.stream, ctx.eval, progress=ctx.progress,
                                       on_logits=_feed(list(ctx.taps.values()))).to_dict()
    else:  # nothing was quantized: the full-precision numbers are the answer
        quant = dict(ctx.fp)
    check_nll(quant["nll"], f"NLL of {ctx.label}")
    fp = ctx.fp
    return {"nll": quant["nll"], "perplexity": quant["perplexity"],
            "nll_sum": quant["nll_sum"], "tokens": quant["tokens"],
            "nll_fp": fp["nll"], "perplexity_fp": fp["perplexity"],
            "dnll": quant["nll"] - fp["nll"], **standard_errors(quant, fp)}


def standard_errors(quant: dict, fp: dict) -> dict:
    """``nll_se`` and the paired ``dnll_se`` from the two passes' per-window sums."""
    tokens = quant["window_tokens"]
    if fp["window_tokens"] != tokens:   # the same windows, or the pairing means nothing
        raise ImplausibleResultError("the quantized and full-precision passes scored different "
                                     "windows: their NLLs cannot be compared")
    diff = [q - f for q, f in zip(quant["window_nll"], fp["window_nll"])]
    return {"nll_se": window_se(quant["window_nll"], tokens), "dnll_se": window_se(diff, tokens)}


def _feed(taps: list):
    """One ``on_logits`` for the pass that hands each window's logits to every tap; None
    without taps (the pass then hands nothing on)."""
    if not taps:
        return None

    def feed(start: int, first: int, logits) -> None:
        for tap in taps:
            tap(start, first, logits)
    return feed


def vocab_size(model) -> int:
    """Rows of the output head: the support of the model's next-token distribution."""
    return model.get_output_embeddings().weight.shape[0]


def check_nll(nll: float, what: str, vocab: int | None = None) -> None:
    """Fail on a non-finite NLL, and (``vocab`` given: full precision) on one above
    ln(vocab), which a uniform guess achieves: the weights or the tokenizer are wrong.
    A quantized model may legitimately be that bad, so only the reference is bounded."""
    if not math.isfinite(nll):
        raise ImplausibleResultError(f"{what} is {nll}: the model produced non-finite logits")
    if vocab is not None and nll > math.log(vocab):
        raise ImplausibleResultError(
            f"{what} is {nll:.4f} nats, above ln(vocab) = {math.log(vocab):.4f} (a uniform "
            "guess): wrong weights or a tokenizer that does not match the model")
