"""GPU cost of a job before it runs: seconds and peak GPU memory per stage, from a model
fitted to our own measurements (issue 20; ``ptqscale-plan`` prints it per job).

The model is fitted, never typed in::

    python -m ptqscale.runner.cost --fit bench/results --results results \
        --tokenizers ../shared/data/tokenizers
    # -> src/ptqscale/assets/cost_model.json (the devices and dates of the data with it)

Data: the benchmark files in ``bench/results`` (``streaming_*_h200.jsonl`` one line per stage;
``bench_gptq``, ``bench_perplexity``, ``bench_landscape_*`` .json) and the GPU records of the
store (``timings``, ``quantization.cost``, ``landscape.cost_*``). Each measurement becomes a
point of one stage (``cost_fit.Point``; the fit and the command line are in runner/cost_fit.py):

==============  =======================================================  ==================
stage           work (the fitted feature besides a constant)             a job's work
==============  =======================================================  ==================
eval            N x tokens scored (one perplexity pass)                  N x eval tokens (*)
rtn             N                                                        N
<method>        N x calibration tokens (gptq, awq, athena, blockft_...)  N x nsamples x seqlen
noise           N x tokens of the noise response passes                  N x (levels x seeds x (2 if antithetic) + 1) x max_tokens
hessian         N x HVPs x tokens per HVP (Hutchinson + power iters)     N x (probes + power_iters) x max_tokens
hessian_fd      N x tokens through gradients (``landscape.hvp=           N x (trace's gradient tokens
                finite_difference``: no double backward, its own rate)   + 2 x power_iters x max_tokens)
fidelity        (the eval stage's fit: forward passes over tokens)       N x min(16384, eval tokens)
==============  =======================================================  ==================

The metric ``fidelity`` is charged a forward pass of the quantized model over its token
budget, plus the fp reference once per model, both at the ``eval`` stage's rate (at 1B the
bench measured 1.2x that rate per job and 2.7x for the reference, 0.14 s and 0.29 s:
bench/results/bench_tasks.md). The per-job pass is an upper bound: the metric now reads the
NLL pass's logits where it can and runs that pass only as its fallback (metrics/fidelity.py,
"Cost"); the excess of the shared case awaits its GPU bench. The metric ``tasks`` gets no estimate: lm-eval's passes depend
on the tasks' items, not on the corpus (at 1B our three offline tasks took 17x a 65k-token NLL
pass), and no fit covers them. The metrics ``fisher`` and ``first_order`` are not charged:
one gradient pass per model (over the calibration windows, or 16,384 evaluation tokens), with
no bench point yet.

(The landscape stage of a job is the noise response and the Hessian; the directional profile
is not part of a job; the rest of the stage, under 1 s on the records, is left out.)

(*) ``eval.max_tokens``, or for a whole local corpus (``max_tokens=null``) its characters x
the tokens per character that the fit measured with the GPT-2 BPE on WikiText-2 test
(``tokens_per_char`` in the model; the families' own tokenizers differ from it, 32k-250k
vocabularies: roughly +-20%). A whole hub corpus gets no estimate.

``N`` is the total parameter count. Per (stage, placement one|streamed, precision 16-bit|fp32)
the fit is ``seconds = a + b * work`` and ``peak GiB = c + d * N``, non-negative least squares
on relative errors (a point of 0.5 s counts as much as one of 100 s). A group measured at one
size only (sizes within 2x) cannot tell a constant from a rate: its time is fitted
proportional to work (``a = 0``), its peak as what the stage holds per parameter
(``HELD_FP32_COPIES``, else the dtype's bytes; nothing when streamed) plus the rest
measured, a constant. What the data does not cover gets no estimate, with the reason: a stage or method never measured in that
placement and precision, a model more than ``MAX_EXTRAPOLATION`` times larger than the
largest one measured, a budgeted placement (``max_gpu_memory``: it trades time for memory),
a whole hub corpus (``eval.max_tokens=null`` and ``data.path=null``).

What the data says of formats: RTN's cost is a weight pass whatever the format (fused
kernels at copy bandwidth, bench_formats). GPTQ on the tiny fp32 records (0.3-24M) takes a
format-dependent time per column (median: int ~2 s, MX and fp8 ~3-4 s, nvfp4 6 s, nf4 11 s),
but every 16-bit GPTQ point at 1-14B is int4_g128: the data cannot say how that spread
scales, so formats are not a feature (bench/bench_cost_check.py measures MX GPTQ at 1.4B). Host work is not estimated: loading (disk or hub download), tokenizing,
preparing calibration data.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COST_MODEL = Path(__file__).resolve().parents[1] / "assets" / "cost_model.json"
GIB = 2**30
# Rate-bound stages grow linearly in N x tokens (the bench's 1-14B shapes agree: streaming.md
# section 3); beyond 8x the largest model measured the placement and memory regime may change,
# so an estimate there would be a guess.
MAX_EXTRAPOLATION = 8.0
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kmb])(\d*)$")


def precision_of(dtype: str) -> str:
    """16-bit | fp32: the fit's precision classes."""
    return "fp32" if dtype in ("float32", "fp32") else "16-bit"


def predict(group: dict, work: float, n_params: float) -> tuple[float, float | None]:
    """(seconds, peak GiB or None) of one stage from its fitted group."""
    a, b = group["seconds"]
    peak = None
    if "peak_gib" in group:
        c, d = group["peak_gib"]
        peak = c + d * n_params
    return a + b * work, peak


def load_cost_model(path: str | Path = COST_MODEL) -> dict | None:
    """The fitted cost model, or None when it was never fitted."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None

# -- a job's estimate -------------------------------------------------------------------------
def nominal_params(size: str) -> float | None:
    """The parameter count a member is published under, from its ``model.size``.

    Example::

        >>> nominal_params("6.9b"), nominal_params("7b1"), nominal_params("160m")
        (6900000000.0, 7100000000.0, 160000000.0)
    """
    match = _SIZE.match(str(size).strip().lower())
    if not match:
        return None
    whole, unit, frac = match.groups()   # BLOOM's "7b1" is 7.1b
    value = float(f"{whole}.{frac}" if frac else whole)
    return value * {"k": 1e3, "m": 1e6, "b": 1e9}[unit]


@dataclass
class StageCost:
    stage: str
    seconds: float
    peak_gib: float | None
    model_level: bool    # shared by every job of the model (fp pass, landscape): paid once


@dataclass
class JobCost:
    """A job's estimate: its stages on ``placement`` (None and ``reason`` when there is none)."""

    stages: list[StageCost] = field(default_factory=list)
    placement: str | None = None
    fits: bool | None = None        # peak within the GPU (None: no memory data)
    reason: str = ""

    @property
    def peak_gib(self) -> float | None:
        peaks = [s.peak_gib for s in self.stages if s.peak_gib is not None]
        return max(peaks) if peaks else None


class NoEstimate(Exception):
    """Why a job has no estimate."""


def corpus_tokens(model: dict, data: Any, max_tokens: int | None) -> float:
    """Tokens a perplexity pass scores: ``max_tokens``, capped by the corpus's estimated size."""
    if data.path is None:
        if max_tokens is not None:
            return float(max_tokens)
        raise NoEstimate(f"eval.max_tokens=null on the hub corpus {data.name!r}: its size is not "
                         "known offline; set eval.max_tokens for an estimate")
    per_char = model.get("tokens_per_char", {}).get("gpt2")
    if per_char is None:
        if max_tokens is not None:
            return float(max_tokens)
        raise NoEstimate("eval.max_tokens=null and no tokens_per_char in the cost model")
    tokens = _corpus_chars(data.name, data.split, data.path, data.text_field,
                           data.max_documents) * per_char
    return tokens if max_tokens is None else min(tokens, float(max_tokens))


@functools.lru_cache(maxsize=64)
def _corpus_chars(name, split, path, text_field, max_documents) -> int:
    from ptqscale.data.corpora import DataConfig, join_documents, load_documents

    cfg = DataConfig(name=name, split=split, path=path, text_field=text_field,
                     max_documents=max_documents)
    return len(join_documents(cfg, load_documents(cfg)))

def job_work(spec: Any, n: float, model: dict | None = None) -> list[tuple[str, float, bool]]:
    """(stage, work, model-level) of every GPU stage of the job ``spec`` (a JobSpec)."""
    tokens = corpus_tokens(model or {}, spec.data, spec.eval.max_tokens)
    stages = [("eval", n * tokens, True), ("eval", n * tokens, False)]  # fp pass, quantized pass
    method = spec.method.name
    if method == "rtn":
        stages.append(("rtn", n, False))
    elif method != "none":
        if spec.calib is None:
            raise NoEstimate(f"method {method} reads no calibration data: no cost feature for it")
        stages.append((method, n * spec.calib.nsamples * spec.calib.seqlen, False))
    metrics = {m.name for m in getattr(spec, "metrics", ())}
    if "tasks" in metrics:
        raise NoEstimate("metric 'tasks': lm-eval's passes are not in the cost model (at 1B our "
                         "three offline tasks took 17x a 65k-token NLL pass: "
                         "bench/results/bench_tasks.md)")
    if "fidelity" in metrics:   # the fp reference once per model, then one pass per job
        from ptqscale.metrics.fidelity import MAX_TOKENS

        fidelity = n * min(tokens, MAX_TOKENS)
        stages += [("fidelity", fidelity, True), ("fidelity", fidelity, False)]
    land = spec.landscape
    if land is not None:
        t = land.max_tokens
        passes = len(land.levels_db) * land.seeds * (2 if land.antithetic else 1) + 1
        stages.append(("noise", n * passes * t, True))
        if land.hessian and land.hvp == "finite_difference":   # gradients, as the job counts them
            from ptqscale.metrics.second_order import eigen_tokens, trace_tokens

            windows = 1   # a stratified probe covers one window of the budget's
            if land.hutchinson_scheme == "stratified":
                windows = max(1, t // (land.seqlen or spec.eval.seqlen))
            grads = trace_tokens(land, windows, t) + eigen_tokens(land, t, land.power_iters)
            stages.append(("hessian_fd", n * grads, True))
        elif land.hessian:   # power iterations may stop early: an upper bound
            stages.append(("hessian", n * (land.hutchinson_probes + land.power_iters) * t, True))
    return stages


def estimate_job(model: dict | None, spec: Any) -> JobCost:
    """The estimate of one job (a JobSpec), on the placement it would run with on an H200
    (``auto``: streamed when the weights plus the job's working margin exceed the GPU)."""
    try:
        return _estimate(model, spec)
    except NoEstimate as e:
        return JobCost(reason=str(e))


def _estimate(model: dict | None, spec: Any) -> JobCost:
    if model is None:
        raise NoEstimate(f"no cost model ({COST_MODEL.name}): python -m ptqscale.runner.cost "
                         "--fit bench/results")
    cfg = spec.model
    n = nominal_params(cfg.size)
    if n is None:
        raise NoEstimate(f"model.size={cfg.size!r} is not a parameter count such as 160m, 6.9b")
    if cfg.max_gpu_memory:
        raise NoEstimate(f"model.max_gpu_memory={cfg.max_gpu_memory}: budgeted runs trade time "
                         "for memory and are not in the fit")
    if cfg.dtype == "auto":
        raise NoEstimate("model.dtype=auto: the checkpoint's dtype is not known offline")
    precision = precision_of(cfg.dtype)
    work = job_work(spec, n, model)
    # the job's own rule for auto (models/streaming.py): the weights plus a working margin
    from ptqscale.models.streaming import WORKING_BYTES, WORKING_FRACTION

    weights = n * (4 if precision == "fp32" else 2)
    too_big = weights * (1 + WORKING_FRACTION) + WORKING_BYTES > model["gpu"]["gib"] * GIB
    placement = cfg.placement
    if placement == "auto":
        placement = "streamed" if too_big else "one"
    elif placement == "one" and too_big:
        raise NoEstimate(f"model.placement=one: {weights / GIB:.0f} GiB of weights and the "
                         f"working margin exceed the H200's {model['gpu']['gib']:.1f} GiB; "
                         "needs model.placement=streamed (or auto)")
    return _on(model, work, n, placement, precision)


def _on(model: dict, work: list, n: float, placement: str, precision: str) -> JobCost:
    stages = []
    for stage, w, level in work:
        fitted = "eval" if stage == "fidelity" else stage   # forward passes, as eval's
        group = model["groups"].get(f"{fitted}|{placement}|{precision}")
        if group is None:
            raise NoEstimate(f"stage {stage!r} was never measured with placement={placement} "
                             f"in {precision} (cost_model.json)")
        limit = model["max_extrapolation"] * group["max_params"]
        if n > limit:
            raise NoEstimate(f"stage {stage!r} ({placement}, {precision}) measured up to "
                             f"{group['max_params'] / 1e9:.3g}B parameters; {n / 1e9:.3g}B is "
                             f"beyond {model['max_extrapolation']:g}x that")
        seconds, peak = predict(group, w, n)
        stages.append(StageCost(stage, seconds, peak, level))
    cost = JobCost(stages, placement)
    cost.fits = fits(model, cost.peak_gib)
    return cost


def fits(model: dict, peak_gib: float | None) -> bool | None:
    """Whether ``peak_gib`` fits the H200 (None: unknown)."""
    gpu = model["gpu"]["gib"]
    return None if gpu is None or peak_gib is None else peak_gib <= gpu

if __name__ == "__main__":   # python -m ptqscale.runner.cost --fit ...: runner/cost_fit.py
    from ptqscale.runner.cost_fit import main

    sys.exit(main())
