"""The measuring half of a job: model-level results (cached) and the quantized model's."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ptqscale import console
from ptqscale.errors import ImplausibleResultError
from ptqscale.files import locked
from ptqscale.models import check_finite
from ptqscale.runner import keys
from ptqscale.store import cache_get, cache_put

# Bytes per parameter that a method leaves unquantized (embeddings, norms, head): the
# 16-bit deployment baseline, whatever dtype the model was loaded in for measuring.
UNQUANTIZED_BYTES = 2


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


def model_level(spec: Any, model: torch.nn.Module, tokenizer: Any, timings: dict) -> dict:
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
                             required=("nll", "perplexity", "nll_sum", "tokens"),
                             check=lambda v: check_nll(v["nll"], what, vocab_size(model)))
    check_nll(fp["nll"], what, vocab_size(model))  # also a value cached before this check
    level = {"anatomy": anatomy, "stream": stream, "fp": fp, "fp_cached": fp_hit,
             "params": count_parameters(model, anatomy), "landscape": None}
    if spec.landscape is not None:
        with console.stage("landscape", timings):
            level["landscape"], level["landscape_cached"] = _cached(
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


def quantize_and_measure(spec: Any, model: torch.nn.Module, tokenizer: Any, level: dict,
                         timings: dict) -> dict:
    """Quantize with the job's method and format; measure; return the record's result part."""
    from ptqscale.methods import QuantContext, quantize
    from ptqscale.metrics import measure_perplexity

    ctx = QuantContext(device=next(model.parameters()).device, progress=spec.progress,
                       cache_dir=os.path.join(spec.cache, "methods"))
    if spec.calib is not None:
        from ptqscale.data import sample_calibration

        with console.stage("calibration", timings):
            ctx.calibration, ctx.calibration_hash = sample_calibration(
                spec.calib, tokenizer, cache_dir=os.path.join(spec.cache, "tokens"))
    torch.manual_seed(spec.seed)
    with console.stage(f"quantize {spec.method.name} {spec.fmt.name}"):
        report = quantize(model, spec.method, ctx)
    timings["quantize"] = report.seconds
    check_finite(model, f"{spec.method.name} into {spec.fmt.name}: the quantized model")

    fp = level["fp"]
    if report.layers:
        with console.stage("quantized eval", timings, "eval"):
            quant = measure_perplexity(model, level["stream"], spec.eval,
                                       progress=spec.progress).to_dict()
    else:  # nothing was quantized: the full-precision numbers are the answer
        quant = dict(fp)
    check_nll(quant["nll"], f"NLL of {spec.model.name!r} after {spec.method.name} "
              f"{spec.fmt.name} on {spec.data.name}")
    params = level["params"]
    metrics = {
        "nll": quant["nll"], "perplexity": quant["perplexity"],
        "nll_sum": quant["nll_sum"], "tokens": quant["tokens"],
        "nll_fp": fp["nll"], "perplexity_fp": fp["perplexity"],
        "dnll": quant["nll"] - fp["nll"],
        "weight_sqnr_db": report.weight_sqnr_db,
        # a method that stores more than the format's bits (codebooks, low-rank factors)
        # reports its own effective bits per weight
        "model_bytes": model_bytes(params["total"], report.quantized_numel,
                                   report.extra.get("bits_per_weight") or spec.fmt.bits_per_weight),
        "fp_cached": level["fp_cached"],
    }
    result: dict[str, Any] = {"metrics": metrics, "params": params,
                              "quantization": report.to_dict(), "layers": report.layers}
    if ctx.calibration_hash:
        result["quantization"]["calibration_hash"] = ctx.calibration_hash
    if level["landscape"] is not None:
        result["landscape"] = _job_landscape(level["landscape"], report.weight_sqnr_db)
    return result


def vocab_size(model: torch.nn.Module) -> int:
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


def model_bytes(total_params: int, quantized_params: int, bits_per_weight: float) -> int:
    """Bytes of the deployed model: quantized weights at their effective bits, the rest at 16."""
    quantized = quantized_params * bits_per_weight / 8
    return int(round(quantized + (total_params - quantized_params) * UNQUANTIZED_BYTES))


def _job_landscape(features: dict, sqnr_db: float | None) -> dict:
    from ptqscale.metrics import noise_equivalent_dnll

    out = {k: v for k, v in features.items() if not isinstance(v, (list, dict))}
    if sqnr_db is not None and features.get("kappa") is not None:
        out["noise_equivalent_dnll"] = noise_equivalent_dnll(features["kappa"], sqnr_db)
    return out
