"""Metric ``top1_agreement``: how often the quantized model's most likely next token is the
full-precision model's, over the scored tokens of the evaluation windows.

Field ``top1_agreement`` in [0, 1], higher is better: 1 where quantization changes no greedy
prediction. Windows and scored tokens are those of the ``eval`` preset (the NLL's), so the
fraction is over ``metrics.tokens`` tokens. ``prepare`` keeps the full-precision argmax of
each scored token (one integer each, on the CPU) before the model is quantized; ties go to
the lowest token id in both models (``torch.argmax``). Not part of the default metrics:
ask for it with ``metrics=[nll,weight_sqnr,model_bytes,top1_agreement]``.
"""

from __future__ import annotations

import torch

from ptqscale import console
from ptqscale.metrics.perplexity import EvalConfig, window_plan
from ptqscale.metrics.registry import MetricContext, register_metric


def greedy_tokens(model, stream: torch.Tensor, cfg: EvalConfig,
                  progress: bool = False) -> torch.Tensor:
    """The model's argmax next token at every scored position of ``cfg``'s windows (1-D, CPU)."""
    stream = stream[:cfg.max_tokens] if cfg.max_tokens is not None else stream
    windows = window_plan(stream.numel(), cfg)
    device = next(model.parameters()).device
    out = []
    batches = console.progress(range(0, len(windows), cfg.batch_size), "top-1", progress,
                               unit="batch")
    with torch.inference_mode():
        for b in batches:
            plan = windows[b:b + cfg.batch_size]
            ids = torch.stack([stream[s:s + cfg.seqlen] for s, _ in plan]).long().to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            out += [logits[row, first - 1:-1].argmax(-1).cpu() for row, (_, first) in enumerate(plan)]
    return torch.cat(out)


def _fp_greedy(ctx: MetricContext) -> torch.Tensor:
    return greedy_tokens(ctx.model, ctx.stream, ctx.eval, ctx.progress)


@register_metric("top1_agreement", higher_is_better=True, version=1,
                 needs=("stream", "fp_model", "report"), prepare=_fp_greedy)
def measure_top1_agreement(ctx: MetricContext) -> dict:
    """Fraction of scored tokens whose greedy prediction quantization left unchanged."""
    fp = ctx.prepared["top1_agreement"]
    quant = greedy_tokens(ctx.model, ctx.stream, ctx.eval, ctx.progress) if ctx.report.layers \
        else fp   # nothing was quantized: the model is the full-precision one
    return {"top1_agreement": float((quant == fp).double().mean())}
