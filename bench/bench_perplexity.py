"""Perplexity throughput of ``measure_perplexity`` vs a naive loop, against the bf16 matmul rate.

    python bench/bench_perplexity.py --out DIR            # CUDA: ~1.1B Llama, seqlen 2048, bf16
    python bench/bench_perplexity.py --out DIR --smoke    # tiny model on CPU (fp32)

Model: a Llama-architecture config of ~1.1B parameters (hidden 2048, 22 layers, FFN 5632, 32 heads,
4 KV heads, vocab 32000: TinyLlama's shape), random weights (timing only), sdpa attention.
Stream: random token ids. ``measure_perplexity`` (gptq preset, batched windows; eager, and with
``EvalConfig.compile``, i.e. regionally compiled decoder blocks and loss) at each ``--batch-sizes``
is compared with the naive loop every GPTQ-style script runs: one window at a time,
``model(w, labels=w).loss``. The compiled rows report their compile time apart: the first call
minus the steady-state median, in a fresh Inductor cache (a cold process; ``--warm-cache`` keeps
the user's cache), plus the compile of a later process that finds the on-disk cache filled.

Model FLOPs per processed token = 2 x (matmul parameters: every Linear incl. the head, not the
embedding lookup) + causal attention 2 x layers x seqlen x hidden (QK^T and AV, half of the
square since the mask skips the upper triangle). The matmul rate is a bf16 8192^3 GEMM measured
in the same run; "fraction" = achieved model FLOP/s / that rate (target >= 0.6). Times: median of
``--repeats`` after a warm-up, synchronised. Writes DIR/bench_perplexity.md and .json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers as T

from ptqscale.metrics import EvalConfig, measure_perplexity

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
SMOKE = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
TARGET = 0.6


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn, repeats: int) -> tuple[float, object]:
    """Median seconds of fn() over ``repeats`` runs after one warm-up; and the last result."""
    seconds, _, out = timed_first(device, fn, repeats)
    return seconds, out


def timed_first(device, fn, repeats: int) -> tuple[float, float, object]:
    """(median seconds after the warm-up, seconds of the warm-up call itself, last result)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first, out


def matmul_rate(device, dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = timed(device, lambda: a @ b, repeats)
    return 2 * n**3 / seconds


def build_model(shape: dict, device, dtype):
    cfg = T.LlamaConfig(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def flops_per_token(model, seqlen: int) -> float:
    cfg = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 2 * cfg.num_hidden_layers * seqlen * cfg.hidden_size
    return 2 * matmul + attention


def naive_nll(model, stream, seqlen: int, windows: int) -> float:
    """One window at a time with the model's own loss (mean over seqlen - 1 predictions)."""
    device = next(model.parameters()).device
    total = 0.0
    with torch.inference_mode():
        for i in range(windows):
            w = stream[i * seqlen:(i + 1) * seqlen].to(device)[None]
            total += model(w, labels=w, use_cache=False).loss.float().item()
    return total / windows


def measure_rows(model, stream, device, args, seqlen: int) -> list[dict]:
    """One row per (eager | compiled) x batch size: steady seconds, compile seconds, NLL."""
    rows = []
    for compiled in (False, True):
        if compiled and args.skip_compile_reason:
            continue
        for batch in args.batch_sizes:
            cfg = EvalConfig(seqlen=seqlen, batch_size=batch, compile=compiled)
            steady, first, res = timed_first(
                device, lambda cfg=cfg: measure_perplexity(model, stream, cfg), args.repeats)
            rows.append({"path": "compiled" if compiled else "eager", "batch_size": batch,
                         "compile_s": first - steady if compiled else None,
                         "seconds": steady, "tokens": res.windows * seqlen, "nll": res.nll})
    return rows


def warm_cache_compile_s(model, stream, device, seqlen: int, batch: int) -> float:
    """Compile seconds of a later process: Dynamo's memory dropped, the on-disk cache kept."""
    torch._dynamo.reset()
    cfg = EvalConfig(seqlen=seqlen, batch_size=batch, compile=True)
    steady, first, _ = timed_first(device, lambda: measure_perplexity(model, stream, cfg), 1)
    return first - steady


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape, seqlen = (SMOKE, 128) if args.smoke else (FULL, args.seqlen)
    model = build_model(shape, device, dtype)
    n_tokens = args.windows * seqlen
    stream = torch.randint(0, shape["vocab_size"], (n_tokens,),
                           generator=torch.Generator().manual_seed(0))
    rows = measure_rows(model, stream, device, args, seqlen)
    warm = None
    if not args.skip_compile_reason:
        warm = warm_cache_compile_s(model, stream, device, seqlen, args.batch_sizes[0])
    naive_windows = min(args.windows, args.naive_windows)
    naive_s, naive = timed(device, lambda: naive_nll(model, stream, seqlen, naive_windows),
                           args.repeats)
    rows.append({"path": "naive loop", "batch_size": 1, "compile_s": None, "seconds": naive_s,
                 "tokens": naive_windows * seqlen, "nll": naive})
    rate = matmul_rate(device, dtype, 512 if args.smoke else 8192, args.repeats)
    fpt = flops_per_token(model, seqlen)
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["tflops"] = row["tokens_per_s"] * fpt / 1e12
        row["fraction"] = row["tokens_per_s"] * fpt / rate
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or "cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": T.__version__, "dtype": str(dtype),
        "smoke": args.smoke, "params": sum(p.numel() for p in model.parameters()),
        "seqlen": seqlen, "batch_sizes": args.batch_sizes, "windows": args.windows,
        "naive_windows": naive_windows, "flops_per_token": fpt, "matmul_tflops": rate / 1e12,
        "inductor_cache": args.inductor_cache, "compile_skipped": args.skip_compile_reason,
        "compile_warm_cache_s": warm, "rows": rows, "target_fraction": TARGET,
        "best_fraction": max(r["fraction"] for r in rows),
    }


def markdown(r: dict) -> str:
    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [f"| {row['path']} | {row['batch_size']} | {cell(row['compile_s'], '.1f')} | "
            f"{row['tokens_per_s']:,.0f} | {row['tflops']:.1f} | {row['fraction']:.1%} | "
            f"{row['nll']:.4f} |" for row in r["rows"]]
    compile_note = (f"Compiled rows skipped: {r['compile_skipped']}." if r["compile_skipped"] else
                    f"Compile seconds: first call minus steady state, Inductor cache "
                    f"{r['inductor_cache']}; a later process with the on-disk cache filled "
                    f"compiles in {r['compile_warm_cache_s']:.1f} s.")
    return "\n".join([
        f"# Perplexity throughput ({r['device']}, {r['date']})", "",
        f"torch {r['torch']}, transformers {r['transformers']}, {r['dtype']}, "
        f"{r['params'] / 1e9:.3f}B params, seqlen {r['seqlen']}, {r['windows']} windows "
        f"(naive loop: {r['naive_windows']}); {r['dtype']} matmul rate "
        f"{r['matmul_tflops']:.1f} TFLOP/s; model FLOPs/token {r['flops_per_token'] / 1e9:.2f} G. "
        f"Target fraction >= {TARGET:.0%}; best {r['best_fraction']:.1%}. {compile_note}",
        "", "| path | batch | compile s | tokens/s | TFLOP/s | fraction of matmul rate | NLL |",
        "|---|---|---|---|---|---|---|", *rows, "",
    ])


def compile_plan(args) -> None:
    """Decide whether the compiled rows run, and which Inductor cache they see (recorded)."""
    args.skip_compile_reason = None
    if args.no_compile:
        args.skip_compile_reason = "--no-compile"
    elif not (torch.cuda.is_available() and not args.smoke) and not shutil.which("c++") \
            and not shutil.which("g++"):
        args.skip_compile_reason = "no C++ compiler for Inductor's CPU backend"
    args.inductor_cache = "kept (--warm-cache)" if args.warm_cache else "fresh (cold compile)"
    if not args.warm_cache:
        fresh = tempfile.mkdtemp(prefix="bench_ppl_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
        os.environ["TRITON_CACHE_DIR"] = os.path.join(fresh, "triton")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-sizes", default="8,16", help="comma-separated windows per batch")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--naive-windows", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    p.add_argument("--warm-cache", action="store_true",
                   help="keep the user's Inductor cache (default: a fresh one, cold compile)")
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.smoke:
        args.windows, args.naive_windows, args.repeats = 8, 4, 1
    compile_plan(args)
    try:
        result = run(args)
    finally:
        if not args.warm_cache:
            shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_perplexity.json").write_text(json.dumps(result, indent=1))
    (out / "bench_perplexity.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
