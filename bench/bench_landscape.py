"""Cost of each loss-landscape feature at the default budget, for a ~1B-parameter Llama.

Usage::

    python bench/bench_landscape.py --out bench/results/landscape            # CUDA, 1B config
    python bench/bench_landscape.py --out /tmp/landscape --smoke             # CPU, tiny config
    python bench/bench_landscape.py --out DIR --features noise,directional   # a subset
    python bench/bench_landscape.py --out DIR --features trace --probes 16   # fewer probes
    python bench/bench_landscape.py --out DIR --features baseline,trace,eigen --probes 16 \
        --scheme stratified --eig-method lanczos --hvp-dtype bfloat16       # issue 23 estimators

The model is a randomly initialised Llama-3.2-1B-shaped config (hidden 2048, 16 layers, 32
heads / 8 KV heads, FFN 8192, vocab 128256, tied embeddings; 1.24B parameters) in bf16. The
unit of cost is one full-precision pass over a WikiText-2-sized stream (300k random token ids,
seqlen 2048, the model in its own bf16, as the perplexity eval runs it); an fp32 pass is timed
too because every landscape feature runs the model in fp32 (docs/landscape.md says why).
Random weights change the features' values, not their cost. Each feature is timed on its own
and the JSON is rewritten after each one, so a run cut short still leaves what it finished.

Memory: every feature records its peak allocated and reserved GiB on CUDA. The HVPs of the
1B run use micro-batches of one window whose graph is rebuilt per product
(``hvp_windows=1, hvp_retain_graph=False``): a retained graph of one 2048-token window needs
about 86 GiB (it ran out of memory on an 80 GB H100), a rebuilt one about 60. Before any
GPU work the peak of one HVP step is also estimated on the meta device (live tensor bytes
of the same code, no compute; ``est GiB``) so that a setting that cannot fit is seen at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
import weakref
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM, masking_utils

from ptqscale.metrics import hessian as hs
from ptqscale.metrics.landscape import (
    EIG_METHODS,
    FD_TRACES,
    HUTCHINSON_SCHEMES,
    HVP_DTYPES,
    HVP_METHODS,
    LandscapeConfig,
    _batch_hvps,
    mean_nll,
    measure_directional_profile,
    measure_hessian,
    measure_noise_response,
)
from ptqscale.metrics.second_order import _parameters_in

FEATURES = ("baseline", "noise", "trace", "eigen", "directional")
SIZES = {  # name: (LlamaConfig kwargs, seqlen, stream tokens)
    "1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                tie_word_embeddings=True, max_position_embeddings=4096), 2048, 300_000),
    "smoke": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                   tie_word_embeddings=True, max_position_embeddings=256), 64, 4096),
}


def rtn_int4(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-channel 4-bit round-to-nearest: a stand-in job quantizer for timing."""
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7
    return (w / scale).round().clamp(-8, 7) * scale


def build(size: str, device: torch.device, dtype: torch.dtype):
    kwargs, seqlen, stream = SIZES[size]
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**kwargs)).to(dtype).eval()
    targets = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, kwargs["vocab_size"], (stream // seqlen, seqlen), generator=gen)
    return model, targets, ids.to(device)


def timed(fn, device: torch.device) -> tuple[object, float, float]:
    """``(result, seconds, peak allocated GiB)``; synchronises CUDA on both sides.

    The peak reserved GiB (what the allocator held, the number an OOM is about) is left in
    ``LAST_RESERVED_GIB``.
    """
    global LAST_RESERVED_GIB
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    LAST_RESERVED_GIB = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None
    return result, time.perf_counter() - start, peak


LAST_RESERVED_GIB: float | None = None


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created under the mode (each storage counted once,
    released when it is freed). On the meta device it measures a program's memory for free."""

    def __init__(self, preexisting):
        super().__init__()
        self.live = self.peak = 0
        self.seen = {id(t.untyped_storage()): None for t in preexisting}  # counted elsewhere

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self.seen:
                st, key = t.untyped_storage(), id(t.untyped_storage())
                self.live += st.nbytes()
                self.seen[key] = weakref.ref(st, partial(self._free, key, st.nbytes()))
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, key: int, nbytes: int, _ref) -> None:
        self.live -= nbytes
        self.seen.pop(key, None)


def estimate_hvp_peak_gib(size: str, cfg: LandscapeConfig) -> dict[str, float]:
    """Peak GiB of the trace and eigenvalue HVP steps at ``cfg``, on the meta device.

    fp32 weights plus the peak of live tensors over: for the trace, two probes against one
    micro-batch (a retained graph is alive for both); for the eigenvalue, one summed HVP
    over two micro-batches (its accumulator is alive too). CUDA adds its allocator's rounding
    and fragmentation (a few GiB) and the context (~0.5 GiB) on top.
    """
    kwargs, seqlen, _ = SIZES[size]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    targets = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    weights = [m.weight for m in targets.values()]
    windows = torch.zeros(2 * cfg.hvp_windows, seqlen, dtype=torch.long, device="meta")
    itemsize = {"float32": 4, "bfloat16": 2}[cfg.hvp_dtype]  # parameters; buffers stay fp32
    fixed = sum(t.numel() * itemsize for t in model.parameters()) + \
        sum(t.numel() * 4 for t in model.buffers())
    out = {}
    # transformers checks position ids for packed sequences with a data-dependent .item(),
    # which meta tensors cannot answer; the landscape windows are never packed.
    find_packed, masking_utils.find_packed_sequence_indices = (
        masking_utils.find_packed_sequence_indices, lambda *a, **k: None)
    try:
        with hs.double_backward_ready(model, weights), _parameters_in(model, cfg.hvp_dtype):
            for feature, retain in (("trace", cfg.hvp_retain_graph), ("eigen", False)):
                batches = _batch_hvps(model, windows, weights, None, cfg, retain)
                with PeakLiveBytes([*model.parameters(), *model.buffers()]) as mode:
                    v = [torch.empty_like(w, dtype=torch.float32) for w in weights]
                    if feature == "trace":
                        hvp = batches[0][1]()
                        for _ in range(2):  # each product is consumed before the next
                            hvp(v)
                        del hvp
                    else:
                        hs.summed_hvp(batches, weights)(v)
                out[feature] = (fixed + mode.peak) / 2**30
    finally:
        masking_utils.find_packed_sequence_indices = find_packed
    return out


def run_feature(name, model, targets, stream, cfg, device) -> dict:
    row = _run_feature(name, model, targets, stream, cfg, device)
    row["peak_reserved_gib"] = LAST_RESERVED_GIB
    return row


def _run_feature(name, model, targets, stream, cfg, device) -> dict:
    windows = stream[: cfg.max_tokens // stream.shape[1]]
    if name == "baseline":
        _, sec, peak = timed(lambda: mean_nll(model, stream, 1), device)
        with hs.fp32(model):
            _, sec32, peak32 = timed(lambda: mean_nll(model, stream, 1), device)
        return {"seconds": sec, "tokens": stream.numel(), "peak_gib": peak,
                "fp32_seconds": sec32, "fp32_peak_gib": peak32}
    if name == "noise":
        out, sec, peak = timed(lambda: measure_noise_response(model, targets, windows, cfg), device)
        return {"seconds": sec, "tokens": out["cost_noise_response_tokens"], "peak_gib": peak,
                "passes": out["cost_noise_response_tokens"] // windows.numel()}
    if name in ("trace", "eigen"):
        probes, iters = (cfg.hutchinson_probes, 0) if name == "trace" else (1, cfg.power_iters)
        sub = {**asdict(cfg), "hutchinson_probes": probes, "power_iters": iters}
        if name == "eigen":  # its one throwaway probe: no window split to respect
            sub["hutchinson_scheme"] = "all_windows"
        sub = LandscapeConfig(**sub)
        out, sec, peak = timed(lambda: measure_hessian(model, targets, windows, sub), device)
        key = "hessian_trace" if name == "trace" else "top_eigenvalue"
        return {"seconds": out[f"cost_{key}_s"], "wall_seconds": sec, "peak_gib": peak,
                "tokens": out[f"cost_{key}_tokens"], "hvps": out[f"cost_{key}_hvps"],
                "power_iters_run": out["power_iters_run"], "hvp_windows": out["hvp_windows"],
                # the values too: a cheaper estimator's error and spread against v1's
                "value": out[key], "sem": out["hessian_trace_sem"] if name == "trace" else None,
                "converged": out["power_converged"] if name == "eigen" else None,
                # the eigenvalue's graphs serve one product each and are never retained
                "hvp_retain_graph": out["hvp_retain_graph"] and name == "trace",
                "hvp_attention": out["hvp_attention"]}
    out, sec, peak = timed(lambda: measure_directional_profile(
        model, targets, windows, rtn_int4, cfg.directional_ts, batch_size=cfg.batch_size), device)
    return {"seconds": sec, "tokens": out["cost_directional_tokens"], "peak_gib": peak}


def markdown(report: dict) -> str:
    base = report["features"].get("baseline", {}).get("seconds")
    lines = [f"# Landscape feature cost: {report['size']} on {report['device']}", "",
             f"{report['date']}, torch {report['torch']}, {report['n_params'] / 1e9:.3f}B params, "
             f"budget: {report['budget']['max_tokens']} tokens, {report['budget']['seeds']} seeds "
             f"(antithetic {report['budget']['antithetic']}), "
             f"{report['budget']['hutchinson_probes']} probes, {report['budget']['power_iters']} "
             f"power iterations, HVP micro-batches of {report['budget']['hvp_windows']} "
             f"window(s), graph {'kept' if report['budget']['hvp_retain_graph'] else 'rebuilt'} "
             f"per product; trace scheme {report['budget'].get('hutchinson_scheme', 'all_windows')}"
             f", eigenvalue by {report['budget'].get('eig_method', 'power')}, HVPs in "
             f"{report['budget'].get('hvp_dtype', 'float32')}, products by "
             f"{report['budget'].get('hvp', 'autograd')}"
             + (f" ({report['budget']['fd_trace']} differences for the trace, eps "
                f"{report['budget']['fd_eps']:g}; eigenvalue eps "
                f"{report['budget']['fd_eps_eig'] or report['budget']['fd_eps']:g})"
                if report['budget'].get('hvp') == "finite_difference" else ""), "",
             "| feature | seconds | x full-precision pass | tokens | HVPs | HVP micro-batch "
             "| peak GiB (reserved) | est GiB |",
             "|---|---|---|---|---|---|---|---|"]
    estimate = report.get("estimate_gib", {})
    for name, row in report["features"].items():
        est = f"{estimate[name]:.2f}" if name in estimate else ""
        if "error" in row:
            lines.append(f"| {name} | {row['error']} | | | | | | {est} |")
            continue
        mult = f"{row['seconds'] / base:.2f}" if base else ""
        peak = "" if row.get("peak_gib") is None else \
            f"{row['peak_gib']:.1f} ({row['peak_reserved_gib']:.1f})"
        micro = "" if "hvp_windows" not in row else \
            f"{row['hvp_windows']} win, {'kept' if row['hvp_retain_graph'] else 'rebuilt'}"
        lines.append(f"| {name} | {row['seconds']:.2f} | {mult} | {row.get('tokens', '')} | "
                     f"{row.get('hvps', '')} | {micro} | {peak} | {est} |")
    if "baseline" in report["features"]:
        b = report["features"]["baseline"]
        lines += ["", f"Full-precision pass: {b['tokens']} tokens, {b['seconds']:.2f} s in the "
                  f"model dtype, {b['fp32_seconds']:.2f} s in fp32."]
    lines += ["", "HVP micro-batch: windows per micro-batch, and whether its gradient graph is "
              "kept across probes or rebuilt per product. est GiB: peak of one HVP step on the "
              "meta device (fp32 weights + live tensors; no allocator overhead)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU")
    p.add_argument("--features", default=",".join(FEATURES),
                   help=f"comma-separated subset of {FEATURES}")
    p.add_argument("--probes", type=int, help="Hutchinson probes (default: the default budget)")
    p.add_argument("--power-iters", type=int, help="power iterations (default: the default budget)")
    p.add_argument("--hvp-windows", type=int, default=1, help="windows per HVP micro-batch")
    p.add_argument("--retain-graph", action="store_true",
                   help="keep each micro-batch's graph across probes (faster, ~1.5x the memory)")
    p.add_argument("--scheme", choices=HUTCHINSON_SCHEMES, default="all_windows",
                   help="landscape.hutchinson_scheme (stratified: probe k on window k mod n)")
    p.add_argument("--eig-method", choices=EIG_METHODS, default="power",
                   help="landscape.eig_method for the top eigenvalue")
    p.add_argument("--hvp-dtype", choices=HVP_DTYPES, default="float32",
                   help="landscape.hvp_dtype: the parameters' dtype during the HVPs")
    p.add_argument("--power-tol", type=float, help="landscape.power_tol (default: the config's)")
    p.add_argument("--hvp", choices=HVP_METHODS, default="autograd",
                   help="landscape.hvp: double backward (eager attention) or finite differences "
                        "of gradients (the model's own attention)")
    p.add_argument("--fd-trace", choices=FD_TRACES, default="central",
                   help="landscape.fd_trace: the trace's finite differences")
    p.add_argument("--fd-eps-eig", type=float, help="landscape.fd_eps_eig: the eigenvalue's step")
    args = p.parse_args(argv)
    features = [f for f in args.features.split(",") if f]
    bad = sorted(set(features) - set(FEATURES))
    if bad:
        p.error(f"unknown features {bad}; allowed: {FEATURES}")
    size = "smoke" if args.smoke else "1b"
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    model, targets, stream = build(size, device, torch.float32 if args.smoke else torch.bfloat16)
    # the default budget (tiny for --smoke); HVP memory settings from the command line
    budget = dict(max_tokens=256, seeds=1, hutchinson_probes=2, power_iters=2) if args.smoke \
        else {}
    budget.update({k: v for k, v in (("hutchinson_probes", args.probes),
                                     ("power_iters", args.power_iters),
                                     ("power_tol", args.power_tol)) if v is not None})
    cfg = LandscapeConfig(enabled=True, seqlen=stream.shape[1], hvp_windows=args.hvp_windows,
                          hvp_retain_graph=args.retain_graph, hutchinson_scheme=args.scheme,
                          eig_method=args.eig_method, hvp_dtype=args.hvp_dtype, hvp=args.hvp,
                          fd_trace=args.fd_trace, fd_eps_eig=args.fd_eps_eig, **budget)
    report = {"size": size, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
              or "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
              "n_params": sum(p.numel() for p in model.parameters()), "budget": asdict(cfg),
              "model": SIZES[size][0], "features": {}}
    # seconds on the CPU, before any GPU time (finite differences need the weights' norm, which
    # the meta device cannot give; their peak is one training step's, measured below)
    if {"trace", "eigen"} & set(features) and cfg.hvp == "autograd":
        report["estimate_gib"] = estimate_hvp_peak_gib(size, cfg)
        print("estimated peak GiB", report["estimate_gib"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in features:
        try:
            report["features"][name] = run_feature(name, model, targets, stream, cfg, device)
        except torch.cuda.OutOfMemoryError as err:  # record it and go on with the next feature
            report["features"][name] = {"error": f"OOM: {str(err).splitlines()[0]}"}
            torch.cuda.empty_cache()
        print(name, report["features"][name], flush=True)
        (args.out / "bench_landscape.json").write_text(json.dumps(report, indent=1))
        (args.out / "bench_landscape.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
