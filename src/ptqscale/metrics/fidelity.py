"""Metric ``fidelity``: how far the quantized model's next-token distribution moved from
the full-precision model's, token by token.

Fields (over ``fidelity_tokens`` scored tokens, see "Budget"):

- ``kl_mean``, ``kl_p90``, ``kl_p99``, ``kl_max``: KL(p_fp || p_q) in nats per token, its
  mean and tail quantiles (``torch.quantile``, linear interpolation). Headline ``kl_mean``,
  lower is better.
- ``top1_agreement``: share of tokens whose argmax (greedy prediction) quantization left
  unchanged; ties go to the lowest token id in both models (``torch.argmax``).
  ``flip_rate`` = 1 - ``top1_agreement``: share whose argmax changed.
- ``fidelity_tokens``, ``fidelity_top_k``: the budget actually used (recorded so that a
  number is never read without its protocol), ``fidelity_fp_cached``: the fp reference
  came from the store's cache (bookkeeping, like ``fp_cached``), and ``fidelity_own_pass``:
  the metric ran a forward pass of the quantized model of its own (false: the NLL pass's
  logits served every window, or nothing was quantized; see "Cost").

Budget: the windows of the job's ``eval`` preset over the first ``MAX_TOKENS`` tokens of
the evaluation stream (fewer where ``eval.max_tokens`` is smaller), so for a short corpus
these are the NLL's own scored tokens. ``MAX_TOKENS`` and ``TOP_K`` are this metric's
protocol: changing either bumps ``VERSION``, which enters the key of every job that asks for
``fidelity`` (jobs that do not are keyed as before).

Full-precision reference, once per model: ``prepare`` runs on the fp model and keeps, per
scored token, the fp argmax and the ``TOP_K`` largest log-probs (float32) with their token
ids (int32), on disk under ``<results>/_cache/fidelity/<key>.pt`` (key: the model's
``fp_eval`` key + this protocol), so the next job of the model reads it instead of a
forward pass. 16384 tokens x 1024 x 8 bytes = 134 MB per model at most.

Why top-k and not the whole distribution: a 128k vocabulary over 16k tokens is 8 GB in
float32 per model, and float16 log-probs carry a relative rounding error of 2^-11 that is
larger than the KL of an int8 model. What is computed is the exact KL of both distributions
coarsened to the fp model's top-k tokens plus one bucket for the rest of the vocabulary. It
equals the full KL when k >= vocab (every model we test with: stories260K has 512 tokens)
and is otherwise a lower bound (data processing), short by exactly
p_fp(rest) * KL(p_fp | rest || p_q | rest), the KL inside the rest bucket weighted by its fp
mass: a few percent of the vocabulary's least likely tokens.

Cost: no forward pass of its own where the job's NLL pass can share: that pass (metric
``nll``, metrics/perplexity.py) hands each window's logits to this metric's tap
(``SharedPass``, registered as ``tap``: registry.py), which keeps the per-token KL and flips
of the windows that are also this metric's (same start, same first scored position: the
windows of the gptq preset always are, the rolling preset's up to its last window when the
budget ends off the stride grid). Those are the same logits in the same dtype as a pass of
its own, so the same numbers: bitwise on CPU (tests/metrics/test_fidelity_shared.py; on a GPU
the NLL pass batches other windows together, which may move the last bits as
``eval.batch_size`` does). The windows it lacks, or all of them where the pass cannot share
(``own_pass_reason``: ``eval.compile=true`` rounds differently, ``eval.head=chunked`` never
holds a window's logits and runs the head on other row counts), get a forward pass of the
quantized model of its own over them, eager with the whole head as before. Any placement
shares: a streamed model's NLL pass walks it block by block on the GPU (the numbers of the
model in one piece), where the metric's own pass, a plain forward, ran a streamed model on
the CPU, where its weights wait. ``fidelity_own_pass`` records whether one ran. None for method
``none`` (nothing quantized: KL 0, no flip) and none for the fp model once its reference is
cached. Ask for it with ``metrics=[nll,weight_sqnr,model_bytes,fidelity]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ptqscale import console
from ptqscale.files import atomic_write, locked, quarantine
from ptqscale.metrics.chunked_head import attention_kernel
from ptqscale.metrics.perplexity import EvalConfig, window_plan
from ptqscale.metrics.registry import MetricContext, register_metric

VERSION = 1
MAX_TOKENS = 16384    # stream tokens the metric looks at (its own budget, protocol)
TOP_K = 1024          # fp log-probs kept per token (the coarsening above, protocol)
_FIELDS = ("logp", "idx", "argmax")
fp_passes = 0         # forward passes spent on fp references in this process (tests read it)
q_passes = 0          # passes of its own over a quantized model in this process (tests read it)


def fidelity_windows(n_tokens: int, cfg: EvalConfig, max_tokens: int) -> list[tuple[int, int]]:
    """The metric's windows ``[(start, first), ...]``: ``cfg``'s plan over the first
    ``min(max_tokens, eval.max_tokens)`` of a stream of ``n_tokens``."""
    return window_plan(min(n_tokens, max_tokens, cfg.max_tokens or max_tokens), cfg)


def scored_logprobs(model, stream: torch.Tensor, cfg: EvalConfig, max_tokens: int,
                    progress: bool = False, windows: list | None = None
                    ) -> Iterator[torch.Tensor]:
    """float32 next-token log-probs ``[scored, vocab]`` of ``cfg``'s windows over the first
    ``max_tokens`` tokens of ``stream`` (``windows``: only these of them), one window at a
    time, on the model's device."""
    if windows is None:
        windows = fidelity_windows(stream.numel(), cfg, max_tokens)
    device = next(model.parameters()).device
    batches = console.progress(range(0, len(windows), cfg.batch_size), "fidelity", progress,
                               unit="batch")
    with torch.inference_mode(), attention_kernel(cfg.attention):  # the NLL pass's kernel
        for b in batches:
            plan = windows[b:b + cfg.batch_size]
            ids = torch.stack([stream[s:s + cfg.seqlen] for s, _ in plan]).long().to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            for row, (_, first) in enumerate(plan):
                yield _logprobs(logits[row], first)


def _logprobs(logits: torch.Tensor, first: int) -> torch.Tensor:
    """One window's scored log-probs from its logits: float32 whatever the model dtype."""
    return torch.log_softmax(logits[first - 1:-1].float(), dim=-1)


def fp_reference(model, stream: torch.Tensor, cfg: EvalConfig, max_tokens: int = MAX_TOKENS,
                 top_k: int = TOP_K, progress: bool = False) -> dict:
    """The fp model's reference: per scored token its top-k log-probs (``logp``, float32,
    descending), their token ids (``idx``, int32) and its argmax (``argmax``), on the CPU."""
    global fp_passes
    fp_passes += 1
    logp, idx, argmax = [], [], []
    for lp in scored_logprobs(model, stream, cfg, max_tokens, progress):
        top = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
        logp.append(top.values.cpu())
        idx.append(top.indices.int().cpu())
        argmax.append(lp.argmax(-1).cpu())
    return {"logp": torch.cat(logp), "idx": torch.cat(idx), "argmax": torch.cat(argmax)}


def token_kl(ref_logp: torch.Tensor, ref_idx: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per token (float64) of ``p`` given by its top-k log-probs ``ref_logp`` at
    token ids ``ref_idx`` and ``q`` by full log-probs ``logq``, both coarsened to those k
    tokens plus one bucket for the rest (exact when k covers the vocabulary)."""
    lp = ref_logp.double()
    lq = logq.gather(-1, ref_idx.long()).double()
    kl = (lp.exp() * (lp - lq)).sum(-1)
    if ref_idx.shape[-1] < logq.shape[-1]:   # the rest bucket; 0 log 0 = 0
        p_rest = (1 - lp.exp().sum(-1)).clamp(min=0)
        q_rest = (1 - lq.exp().sum(-1)).clamp(min=1e-300)
        kl = kl + torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-300).log()
                                                    - q_rest.log()), 0.0)
    return kl.clamp(min=0)   # rounding may leave -1e-17 where both agree


class SharedPass:
    """The fidelity windows' per-token KL and flips, from the logits of the quantized model's
    NLL pass (``measure_perplexity(on_logits=...)``): a window the pass scores with the same
    start and first scored position is the metric's own window, the same logits."""

    def __init__(self, ref: dict, windows: list[tuple[int, int]], seqlen: int):
        self.ref, self.offset, self.parts, at = ref, {}, {}, 0
        for w in windows:   # where each window's tokens lie in the reference
            self.offset[w] = at
            at += seqlen - w[1]

    def __call__(self, start: int, first: int, logits: torch.Tensor) -> None:
        w = (start, first)
        if w in self.offset and w not in self.parts:
            self.parts[w] = _window_fields(self.ref, self.offset[w], _logprobs(logits, first))


def _window_fields(ref: dict, at: int, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL and argmax flips of one window whose tokens start at ``at``, on ``lq``'s
    device (the NLL pass is not held up by a copy back per window)."""
    n, dev = lq.shape[0], lq.device
    kl = token_kl(ref["logp"][at:at + n].to(dev), ref["idx"][at:at + n].to(dev), lq)
    return kl, lq.argmax(-1) != ref["argmax"][at:at + n].to(dev)


def compare(model, stream: torch.Tensor, cfg: EvalConfig, ref: dict,
            max_tokens: int = MAX_TOKENS, progress: bool = False,
            shared: SharedPass | None = None) -> dict:
    """The fidelity fields of ``model`` against the fp reference ``ref`` (same windows): the
    windows ``shared`` holds from the NLL pass as they are, the others by a pass of its own."""
    global q_passes
    windows = fidelity_windows(stream.numel(), cfg, max_tokens)
    done = shared.parts if shared is not None else {}
    missing = [w for w in windows if w not in done]
    own = scored_logprobs(model, stream, cfg, max_tokens, progress, missing)
    q_passes += bool(missing)
    kls, flips, at = [], [], 0
    for w in windows:
        kl, flip = done[w] if w in done else _window_fields(ref, at, next(own))
        kls.append(kl.cpu())
        flips.append(flip.cpu())
        at += kl.numel()
    if at != ref["argmax"].numel():
        raise RuntimeError(f"fidelity: {at} scored tokens against a reference of "
                           f"{ref['argmax'].numel()}: the windows changed")
    return summarize(torch.cat(kls), torch.cat(flips), ref["logp"].shape[-1])


def summarize(kl: torch.Tensor, flipped: torch.Tensor, top_k: int) -> dict:
    """Record fields of per-token KLs and argmax flips."""
    q = torch.quantile(kl, torch.tensor([0.9, 0.99], dtype=kl.dtype)).tolist()
    flip = float(flipped.double().mean())
    return {"kl_mean": float(kl.mean()), "kl_p90": q[0], "kl_p99": q[1],
            "kl_max": float(kl.max()), "top1_agreement": 1.0 - flip, "flip_rate": flip,
            "fidelity_tokens": int(kl.numel()), "fidelity_top_k": int(top_k)}


def _cache_path(ctx: MetricContext) -> Path | None:
    """Where this model's reference lies: None without a results root (no caching)."""
    if not ctx.results or not ctx.fp_key:
        return None
    from ptqscale.runner.keys import digest

    key = digest({"fp_eval": ctx.fp_key, "fidelity": {"version": VERSION,
                                                      "max_tokens": MAX_TOKENS,
                                                      "top_k": TOP_K}})
    return Path(ctx.results) / "_cache" / "fidelity" / f"{key}.pt"


def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        ref = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ref, dict) or any(f not in ref for f in _FIELDS):
            raise ValueError(f"not a dict with {list(_FIELDS)}")
        return ref
    except Exception as e:  # noqa: BLE001 - any unreadable file is recomputed
        quarantine(path, str(e), "fidelity cache entry", "it will be recomputed")
        return None


def prepare_reference(ctx: MetricContext) -> dict:
    """The fp reference of the model: from the cache, else computed and cached."""
    path = _cache_path(ctx)
    compute = lambda: fp_reference(ctx.model, ctx.stream, ctx.eval, progress=ctx.progress)  # noqa: E731
    if path is None:
        return {**compute(), "cached": False}
    ref = _load(path)
    if ref is None:
        with locked(path.with_name(f".{path.name}.lock")):   # one process computes it
            ref = _load(path)
            if ref is None:
                value = compute()
                atomic_write(path, lambda f: torch.save(value, f), binary=True)
                return {**value, "cached": False}
    return {**ref, "cached": True}


def own_pass_reason(cfg: EvalConfig) -> str | None:
    """Why the NLL pass cannot hand this metric its logits (None: it can). The metric's own
    pass is eager, with the whole head: only such an NLL pass gives the same logits (a
    compiled pass rounds differently, the chunked head runs the head GEMM on other row counts
    and holds no window's logits at once). Any placement shares: a streamed model's walk and a
    spread model's forward give the logits of the model in one piece."""
    return ("eval.compile=true" if cfg.compile else
            "eval.head=chunked" if cfg.head == "chunked" else None)


def shared_pass(ctx: MetricContext) -> SharedPass | None:
    """The tap on the NLL pass (registry.py), or None where this job's pass cannot share."""
    if not ctx.report.layers or own_pass_reason(ctx.eval) is not None:
        return None
    ref = ctx.prepared["fidelity"]
    return SharedPass(ref, fidelity_windows(ctx.stream.numel(), ctx.eval, MAX_TOKENS),
                      ctx.eval.seqlen)


@register_metric("fidelity", higher_is_better=False, version=VERSION, headline="kl_mean",
                 needs=("stream", "fp_model", "report"), prepare=prepare_reference,
                 tap=shared_pass,
                 directions={"kl_*": False, "flip_rate": False, "top1_agreement": True})
def measure_fidelity(ctx: MetricContext) -> dict:
    """KL to the fp model (mean, p90, p99, max), top-1 agreement and flip rate."""
    ref = ctx.prepared["fidelity"]
    own = False
    if ctx.report.layers:
        shared = ctx.taps.get("fidelity")
        before = q_passes
        with console.stage("fidelity", ctx.timings, "fidelity"):
            out = compare(ctx.model, ctx.stream, ctx.eval, ref, progress=ctx.progress,
                          shared=shared)
        own = q_passes > before
    else:   # nothing was quantized: the model is the fp one
        n = ref["argmax"].numel()
        out = summarize(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool),
                        ref["logp"].shape[-1])
    return {**out, "fidelity_fp_cached": bool(ref["cached"]), "fidelity_own_pass": own}
