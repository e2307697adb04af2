"""Cost of each loss-landscape feature at the default budget, for a ~1B-parameter Llama.

Usage::

    python bench/bench_landscape.py --out bench/results/landscape            # CUDA, 1B config
    python bench/bench_landscape.py --out /tmp/landscape --smoke             # CPU, tiny config
    python bench/bench_landscape.py --out DIR --features noise,directional   # a subset

The model is a randomly initialised Llama-3.2-1B-shaped config (hidden 2048, 16 layers, 32
heads / 8 KV heads, FFN 8192, vocab 128256, tied embeddings; 1.24B parameters) in bf16. The
unit of cost is one full-precision pass over a WikiText-2-sized stream (300k random token ids,
seqlen 2048, the model in its own bf16, as the perplexity eval runs it); an fp32 pass is timed
too because every landscape feature runs the model in fp32 (docs/landscape.md says why).
Random weights change the features' values, not their cost. Each feature is timed on its own
and the JSON is rewritten after each one, so a run cut short still leaves what it finished.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from ptqscale.metrics import hessian as hs
from ptqscale.metrics.landscape import (
    LandscapeConfig,
    mean_nll,
    measure_directional_profile,
    measure_hessian,
    measure_noise_response,
)

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
    """``(result, seconds, peak GiB)``; synchronises CUDA on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return result, time.perf_counter() - start, peak


def run_feature(name, model, targets, stream, cfg, device) -> dict:
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
        sub = LandscapeConfig(**{**asdict(cfg), "hutchinson_probes": probes, "power_iters": iters})
        out, sec, peak = timed(lambda: measure_hessian(model, targets, windows, sub), device)
        key = "hessian_trace" if name == "trace" else "top_eigenvalue"
        return {"seconds": out[f"cost_{key}_s"], "wall_seconds": sec, "peak_gib": peak,
                "tokens": out[f"cost_{key}_tokens"], "hvps": out[f"cost_{key}_hvps"],
                "power_iters_run": out["power_iters_run"]}
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
             "power iterations", "",
             "| feature | seconds | x full-precision pass | tokens | HVPs | peak GiB |",
             "|---|---|---|---|---|---|"]
    for name, row in report["features"].items():
        if "error" in row:
            lines.append(f"| {name} | {row['error']} | | | | |")
            continue
        mult = f"{row['seconds'] / base:.2f}" if base else ""
        peak = "" if row.get("peak_gib") is None else f"{row['peak_gib']:.1f}"
        lines.append(f"| {name} | {row['seconds']:.2f} | {mult} | {row.get('tokens', '')} | "
                     f"{row.get('hvps', '')} | {peak} |")
    if "baseline" in report["features"]:
        b = report["features"]["baseline"]
        lines += ["", f"Full-precision pass: {b['tokens']} tokens, {b['seconds']:.2f} s in the "
                  f"model dtype, {b['fp32_seconds']:.2f} s in fp32."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU")
    p.add_argument("--features", default=",".join(FEATURES),
                   help=f"comma-separated subset of {FEATURES}")
    args = p.parse_args(argv)
    features = [f for f in args.features.split(",") if f]
    bad = sorted(set(features) - set(FEATURES))
    if bad:
        p.error(f"unknown features {bad}; allowed: {FEATURES}")
    size = "smoke" if args.smoke else "1b"
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    model, targets, stream = build(size, device, torch.float32 if args.smoke else torch.bfloat16)
    cfg = LandscapeConfig(enabled=True, seqlen=stream.shape[1])  # the default budget
    if args.smoke:
        cfg = LandscapeConfig(enabled=True, seqlen=stream.shape[1], max_tokens=256, seeds=1,
                              hutchinson_probes=2, power_iters=2)
    report = {"size": size, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
              or "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
              "n_params": sum(p.numel() for p in model.parameters()), "budget": asdict(cfg),
              "model": SIZES[size][0], "features": {}}
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
