"""Metric ``first_order``: the first-order part of the job's damage, ``g . e``, from the fp model.

Field ``first_order_dnll`` (nats): the mean NLL's gradient ``g`` of the full-precision model on
the evaluation text, dotted with the job's weight error ``e = Q(W) - W`` over the target
layers::

    dNLL = g . e + e^T H e / 2 + ...        first_order_dnll = g . e

No model is evaluated quantized for it. A model at a minimum of the text's loss has ``g ~ 0``
and its damage is the second-order part, which the landscape's noise response measures (its
antithetic pairs cancel ``g . e``). A model that is not (text other than its training
distribution) has a gradient, and quantization error that happens to point down it *lowers*
the NLL: quantizing the zoo's models, trained for two epochs on Gutenberg, lowers their
WikiText-2 NLL by more than two standard errors in 137 of 480 jobs, which no second-order
feature can describe. There ``g . e`` is about half the damage (median 51-55% over jobs above
0.01 nats; results/zoo_cross_x4/findings.md), and ``ptqscale-fit --lofo`` adds it to the
physics guess (docs/analysis.md, "Transfer across families").

Budget: non-overlapping windows of ``eval.seqlen`` over the first ``MAX_TOKENS`` tokens of the
evaluation stream (or ``eval.max_tokens``, when smaller): the text whose NLL the job measures,
as the landscape's noise response uses it. ``MAX_TOKENS`` is this metric's protocol.

Cost: one forward and backward per ``eval.batch_size`` windows on the fp model (``prepare``),
kept for the worker's next job of the same model and text. Null where nothing changed (bf16).
"""

from __future__ import annotations

import torch

from ptqscale.metrics.fisher import prepare_weight_statistic, weight_errors
from ptqscale.metrics.registry import MetricContext, register_metric

VERSION = 1
MAX_TOKENS = 16384    # evaluation tokens the gradient is taken on (protocol)


def gradient_windows(stream: torch.Tensor, seqlen: int, max_tokens: int | None) -> torch.Tensor:
    """``[n, seqlen]`` non-overlapping windows over the first ``min(MAX_TOKENS, max_tokens)``
    tokens of ``stream``."""
    budget = min(MAX_TOKENS, max_tokens or MAX_TOKENS, stream.numel())
    n = budget // seqlen
    if n < 1:
        raise ValueError(f"first_order: the stream holds {stream.numel()} tokens, fewer than "
                         f"one window of {seqlen}")
    return stream[: n * seqlen].reshape(n, seqlen)


def mean_gradient(model, weights: list[torch.Tensor], windows: torch.Tensor,
                  batch_size: int = 8) -> list[torch.Tensor]:
    """The gradient of the mean NLL over ``windows`` (equal lengths: the token mean) w.r.t.
    ``weights``, float32. ``model`` must be ready for gradients w.r.t. ``weights`` only."""
    from ptqscale.metrics.landscape import nll_loss

    grad = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    for ids in windows.split(batch_size):
        share = ids.shape[0] / windows.shape[0]
        for g, d in zip(grad, torch.autograd.grad(nll_loss(model, ids), weights)):
            g.add_(d.detach().float(), alpha=share)
    return grad


def dot(grad: list[torch.Tensor], errors: list[torch.Tensor]) -> float | None:
    """``g . e`` in float64 (None when the error is zero)."""
    if not any(bool(e.any()) for e in errors):
        return None
    return float(sum((g.double() * e.double()).sum() for g, e in zip(grad, errors)))


def prepare_first_order(ctx: MetricContext) -> dict:
    """The fp model's mean gradient on the evaluation windows and the targets' fp weights."""
    windows = gradient_windows(ctx.stream, ctx.eval.seqlen, ctx.eval.max_tokens)
    return prepare_weight_statistic(
        ctx, "first_order", windows,
        lambda model, weights, w: mean_gradient(model, weights, w, ctx.eval.batch_size))


@register_metric("first_order", higher_is_better=False, version=VERSION,
                 headline="first_order_dnll", needs=("stream", "fp_model", "report"),
                 prepare=prepare_first_order)
def measure_first_order(ctx: MetricContext) -> dict:
    grad = ctx.prepared["first_order"]["statistic"]
    return {"first_order_dnll": dot(grad, weight_errors(ctx, "first_order"))}
