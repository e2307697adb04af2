"""Perplexity throughput of ``measure_perplexity`` vs a naive loop, against the bf16 matmul rate.

    python bench/bench_perplexity.py --out DIR            # CUDA: ~1.1B Llama, seqlen 2048, bf16
    python bench/bench_perplexity.py --out DIR --smoke    # tiny model on CPU (fp32)

Model: a Llama-architecture config of ~1.1B parameters (hidden 2048, 22 layers, FFN 5632, 32 heads,
4 KV heads, vocab 32000: TinyLlama's shape), random weights (timing only), sdpa attention.
Stream: random token ids. ``measure_perplexity`` (gptq preset, batched windows) is compared with
the naive loop every GPTQ-style script runs: one window at a time, ``model(w, labels=w).loss``.

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
import platform
import statistics
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
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


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


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape, seqlen = (SMOKE, 128) if args.smoke else (FULL, args.seqlen)
    model = build_model(shape, device, dtype)
    n_tokens = args.windows * seqlen
    stream = torch.randint(0, shape["vocab_size"], (n_tokens,), generator=torch.Generator().manual_seed(0))
    cfg = EvalConfig(seqlen=seqlen, batch_size=args.batch_size)
    ours_s, res = timed(device, lambda: measure_perplexity(model, stream, cfg), args.repeats)
    naive_windows = min(args.windows, args.naive_windows)
    naive_s, naive = timed(device, lambda: naive_nll(model, stream, seqlen, naive_windows),
                           args.repeats)
    rate = matmul_rate(device, dtype, 512 if args.smoke else 8192, args.repeats)
    fpt = flops_per_token(model, seqlen)
    ours_tps, naive_tps = n_tokens / ours_s, naive_windows * seqlen / naive_s
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": T.__version__, "dtype": str(dtype),
        "smoke": args.smoke, "params": sum(p.numel() for p in model.parameters()),
        "seqlen": seqlen, "batch_size": args.batch_size, "windows": args.windows,
        "flops_per_token": fpt, "matmul_tflops": rate / 1e12,
        "ours": {"tokens_per_s": ours_tps, "tflops": ours_tps * fpt / 1e12,
                 "fraction": ours_tps * fpt / rate, "nll": res.nll, "seconds": ours_s},
        "naive": {"tokens_per_s": naive_tps, "tflops": naive_tps * fpt / 1e12,
                  "fraction": naive_tps * fpt / rate, "nll": naive, "windows": naive_windows,
                  "seconds": naive_s},
        "target_fraction": TARGET,
    }


def markdown(r: dict) -> str:
    rows = [f"| {name} | {r[k]['tokens_per_s']:,.0f} | {r[k]['tflops']:.1f} | "
            f"{r[k]['fraction']:.1%} | {r[k]['nll']:.4f} |"
            for name, k in (("measure_perplexity (batched)", "ours"), ("naive loop", "naive"))]
    return "\n".join([
        f"# Perplexity throughput ({r['device']}, {r['date']})", "",
        f"torch {r['torch']}, transformers {r['transformers']}, {r['dtype']}, "
        f"{r['params'] / 1e9:.3f}B params, seqlen {r['seqlen']}, batch {r['batch_size']}, "
        f"{r['windows']} windows; {r['dtype']} matmul rate {r['matmul_tflops']:.1f} TFLOP/s; "
        f"model FLOPs/token {r['flops_per_token'] / 1e9:.2f} G. Target fraction >= {TARGET:.0%}.",
        "", "| path | tokens/s | TFLOP/s | fraction of matmul rate | NLL |", "|---|---|---|---|---|",
        *rows, "",
    ])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--naive-windows", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.smoke:
        args.windows, args.naive_windows, args.repeats = 8, 4, 1
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_perplexity.json").write_text(json.dumps(result, indent=1))
    (out / "bench_perplexity.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
