"""The measuring half of a job: model-level results (cached) and the quantized model's.

What is measured after quantization is the job's ``metrics`` (ptqscale/metrics/registry.py):
this module provides what each metric needs and loops over them; it names none of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptqscale import console
from ptqscale.files import locked
from ptqscale.metrics.nll import check_nll, vocab_size
from ptqscale.metrics.registry import MetricContext
from ptqscale.models import check_finite
from ptqscale.runner import keys
from ptqscale.store import cache_get, cache_put

__all__ = ["ModelLevel", "check_nll", "measure_metrics", "model_level", "quantize_and_measure",
           "vocab_size"]


def _cached(root: str, kind: str, key: str, compute, required: tuple[str, ...] = (),
            check=None) -> tuple[dict, bool]:
    """``compute()`` once per key across jobs and processes; returns (value, was_cached).

    An entry without the ``required`` keys is corrupt: moved aside and recomputed.
    ``check(value)`` raises for a value that cannot be right: it is then never cached.
    """
    hit = cache_get(root, kind, key, required)
    if hit is not None:
        return hit, True
    # one process computes a shared entry; the others wait and read it
    with locked(Path(root) / "_cache" / kind / f".{key}.lock"):
        hit = cache_get(root, kind, key, required)
        if hit is not None:
            return hit, True
        value = compute()
        if check is not None:
            check(value)
        cache_put(root, kind, key, value)
        return value, False


@dataclass
class ModelLevel:
    """What depends on the model but not on the method: measured once per model (cached)."""

    anatomy: Any                      # models.Anatomy: the targets and their roles
    stream: torch.Tensor              # the evaluation corpus as 1-D token ids
    fp: dict                          # full-precision NLL result (measure_perplexity's dict)
    fp_cached: bool                   # fp came from the store's cache
    params: dict                      # parameter counts (models.count_parameters)
    landscape: dict | None = None     # landscape features, where the job asks for them
    landscape_cached: bool = False
    fp_key: str = ""                  # key of fp (metrics key their own per-model caches by it)


def model_level(spec: Any, model: torch.nn.Module, tokenizer: Any, timings: dict) -> ModelLevel:
    """Everything that depends on the model but not on the method: computed once per model."""
    from ptqscale.data import tokenize_corpus
    from ptqscale.metrics import measure_perplexity
    from ptqscale.models import count_parameters, get_anatomy

    anatomy = get_anatomy(model)
    with console.stage("tokenize", timings):
        stream = tokenize_corpus(spec.data, tokenizer,
                                 cache_dir=os.path.join(spec.cache, "tokens"),
                                 preset=spec.eval.preset)
    what = f"full-precision NLL of {spec.model.name!r} on {spec.data.name}"
    with console.stage("full-precision eval", timings, "fp_eval"):
        fp_key = keys.fp_eval_key(spec.model, spec.data, spec.eval, spec.files)
        fp, fp_hit = _cached(spec.results, "fp_eval", fp_key,
                             lambda: measure_perplexity(model, stream, spec.eval,
                                                        progress=spec.progress).to_dict(),
                             required=("nll", "perplexity", "nll_sum", "tokens", "window_nll",
                                       "window_tokens"),
                             check=lambda v: check_nll(v["nll"], what, vocab_size(model)))
    check_nll(fp["nll"], what, vocab_size(model))  # also a value cached before this check
    level = ModelLevel(anatomy=anatomy, stream=stream, fp=fp, fp_cached=fp_hit,
                       params=count_parameters(model, anatomy), fp_key=fp_key)
    if spec.landscape is not None:
        with console.stage("landscape", timings):
            level.landscape, level.landscape_cached = _cached(
                spec.results, "landscape",
                keys.landscape_key(spec.model, spec.data, spec.eval, spec.landscape, spec.files),
                lambda: _measure_landscape(spec, model, anatomy, stream),
                required=("landscape_protocol", "kappa"))
    return level


def _measure_landscape(spec: Any, model, anatomy, stream: torch.Tensor) -> dict:
    from ptqscale.metrics import measure_landscape

    seqlen = spec.landscape.seqlen or spec.eval.seqlen
    n = max(1, min(spec.landscape.max_tokens, stream.numel()) // seqlen)
    batches = stream[: n * seqlen].view(n, seqlen)
    return measure_landscape(model, dict(anatomy.targets), batches, spec.landscape,
                             spec.progress)


def quantize_and_measure(spec: Any, model: torch.nn.Module, tokenizer: Any, level: ModelLevel,
                         timings: dict) -> dict:
    """Quantize with the job's method and format; measure the job's metrics; return the
    record's result part (``metrics``, ``metric_info``, ``params``, ``quantization``, ...)."""
    from ptqscale.methods import QuantContext, quantize

    ctx = QuantContext(device=next(model.parameters()).device, progress=spec.progress,
                       cache_dir=os.path.join(spec.cache, "methods"))
    if spec.calib is not None:
        from ptqscale.data import sample_calibration

        with console.stage("calibration", timings):
            ctx.calibration, ctx.calibration_hash = sample_calibration(
                spec.calib, tokenizer, cache_dir=os.path.join(spec.cache, "tokens"))
    mctx = MetricContext(
        model=model, stream=level.stream, eval=spec.eval, fp=level.fp, params=level.params,
        fmt=spec.fmt, method=spec.method, tokenizer=tokenizer, progress=spec.progress,
        timings=timings, calibration=ctx.calibration, results=spec.results,
        fp_key=level.fp_key,
        label=f"{spec.model.name!r} after {spec.method.name} {spec.fmt.name} on {spec.data.name}")
    for metric in spec.metrics:   # on the full-precision model, before it is quantized
        if metric.prepare is not None:
            with console.stage(f"prepare {metric.name}", timings, f"prepare_{metric.name}"):
                mctx.prepared[metric.name] = metric.prepare(mctx)
    torch.manual_seed(spec.seed)
    with console.stage(f"quantize {spec.method.name} {spec.fmt.name}"):
        report = quantize(model, spec.method, ctx)
    timings["quantize"] = report.seconds
    # The loader refused non-finite fp weights and formats keep them in place: a hit here is
    # one the method or the format created (an fp16 overflow, a GPTQ update gone inf).
    check_finite(model, f"{spec.method.name} into {spec.fmt.name}: the quantized model "
                        "(its full-precision weights were finite at load)")

    mctx.report = report
    metrics = measure_metrics(spec.metrics, mctx)
    metrics["fp_cached"] = level.fp_cached   # bookkeeping of the model-level cache
    result: dict[str, Any] = {"metrics": metrics,
                              "metric_info": {m.name: m.info(spec.eval) for m in spec.metrics},
                              "params": level.params,
                              "quantization": report.to_dict(), "layers": report.layers}
    if ctx.calibration_hash:
        result["quantization"]["calibration_hash"] = ctx.calibration_hash
    if level.landscape is not None:
        result["landscape"] = _job_landscape(level.landscape, report.weight_sqnr_db)
    return result


def measure_metrics(metrics: tuple, ctx: MetricContext) -> dict:
    """Each metric's fields, in the order asked; two metrics writing one field is a bug.

    Metrics with a ``tap`` (registry.py) compute last: the NLL pass feeds their taps first."""
    for metric in metrics:
        if metric.tap is not None and (consumer := metric.tap(ctx)) is not None:
            ctx.taps[metric.name] = consumer
    computed = {m.name: m.compute(ctx) for m in sorted(metrics, key=lambda m: m.tap is not None)}
    out: dict[str, Any] = {}
    for metric in metrics:
        values = computed[metric.name]
        clash = sorted(set(values) & (set(out) | {"fp_cached"}))
        if clash:
            raise RuntimeError(f"metric {metric.name!r} writes {clash}, which another metric "
                               "or the runner writes too")
        out.update(values)
    return out


def _job_landscape(features: dict, sqnr_db: float | None) -> dict:
    from ptqscale.metrics import noise_equivalent_dnll

    out = {k: v for k, v in features.items() if not isinstance(v, (list, dict))}
    if sqnr_db is not None and features.get("kappa") is not None:
        out["noise_equivalent_dnll"] = noise_equivalent_dnll(features["kappa"], sqnr_db)
    return out
