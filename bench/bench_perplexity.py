"""Perplexity throughput of ``measure_perplexity``'s paths against the bf16 matmul rate, in one run.

    python bench/bench_perplexity.py --out DIR            # CUDA: ~1.1B Llama, seqlen 2048, bf16
    python bench/bench_perplexity.py --out DIR --smoke    # tiny model on CPU (fp32)

Model: a Llama-architecture config of ~1.1B parameters (hidden 2048, 22 layers, FFN 5632, 32 heads,
4 KV heads, vocab 32000: TinyLlama's shape), random weights (timing only), sdpa attention.
Stream: random token ids. Paths (gptq preset, ``--batch-sizes`` windows per pass):

- ``eager`` / ``compiled``: the full logits of a batch, then the loss (``eval.head=logits``;
  ``eval.compile``: regionally compiled decoder blocks and loss), as before;
- ``... chunked``: ``eval.head=chunked``, the head and loss in chunks of positions, the
  logits of a batch never materialised; ``+ cudnn`` / ``+ flash``: ``eval.attention`` pinned;
  ``+ CUDA graphs``: ``eval.cuda_graphs`` (the compiled decoder replayed as CUDA graphs);
- ``naive loop``: one window at a time, ``model(w, labels=w).loss`` (every GPTQ-style script).

A path that fails (a kernel PyTorch cannot run here) is a row with its error, not a lost run.
Compiled rows report their compile time apart: the first call minus the steady-state median,
Inductor cache fresh per process (``--warm-cache`` keeps the user's). Each row records the
attention kernel that ran (``env.attention``) and the peak GPU memory of the pass.

Model FLOPs per processed token = 2 x (matmul parameters: every Linear incl. the head, not the
embedding lookup) + causal attention 2 x layers x seqlen x hidden (QK^T and AV, half of the
square since the mask skips the upper triangle). The matmul rate is a bf16 8192^3 GEMM measured
in the same run, before and after the passes, the higher of the two; "fraction" = achieved
model FLOP/s / that rate (target >= 0.75). Times: median
of ``--repeats`` after a warm-up, synchronised.

What bounds the rest (CUDA): the best path profiled (GPU time per kernel class: matmul,
attention, loss, other fused Triton kernels, other; and the gap, wall minus kernel time, i.e.
launch overhead and host work), and the ceiling of the model's own shapes: each Linear's GEMM
at M = batch x seqlen and the attention (each SDPA kernel) timed alone. Writes
DIR/bench_perplexity.md and .json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch
import transformers as T
from bench_perplexity_parts import (
    attention_rates,
    gemm_ceiling,
    markdown,
    profile_pass,
    timed,
    timed_first,
)

from ptqscale.metrics import EvalConfig, measure_perplexity

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
SMOKE = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
TARGET = 0.75
# (path name, EvalConfig changes); the first two are the paths of the earlier table
PATHS = [("eager", {}), ("compiled", dict(compile=True)),
         ("eager chunked", dict(head="chunked")),
         ("compiled chunked", dict(compile=True, head="chunked")),
         ("compiled chunked + cudnn", dict(compile=True, head="chunked", attention="cudnn")),
         ("compiled chunked + flash", dict(compile=True, head="chunked", attention="flash")),
         ("compiled chunked + CUDA graphs", dict(compile=True, head="chunked", cuda_graphs=True)),
         ("compiled chunked + flash + CUDA graphs",
          dict(compile=True, head="chunked", attention="flash", cuda_graphs=True))]


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


def measure_row(model, stream, device, args, path: str, changes: dict, batch: int) -> dict:
    """One path at one batch size: steady seconds, compile seconds, NLL, peak memory, kernel."""
    cfg = EvalConfig(seqlen=args.seqlen, batch_size=batch, **changes)
    row = {"path": path, "batch_size": batch, "eval": changes, "compile_s": None}
    if cfg.compile:
        torch._dynamo.reset()  # its own graphs: the SDPA kernel is chosen when tracing
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        steady, first, res = timed_first(
            device, lambda: measure_perplexity(model, stream, cfg), args.repeats)
    except Exception as e:  # noqa: BLE001 - a path this machine cannot run is a result too
        return {**row, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
    return {**row, "compile_s": first - steady if cfg.compile else None, "seconds": steady,
            "tokens": res.windows * args.seqlen, "nll": res.nll,
            "attention": getattr(model, "ptqscale_attention", None),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda" else None}


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SMOKE if args.smoke else FULL
    model = build_model(shape, device, dtype)
    stream = torch.randint(0, shape["vocab_size"], (args.windows * args.seqlen,),
                           generator=torch.Generator().manual_seed(0))
    gemm_n = 512 if args.smoke else 8192
    rate_before = matmul_rate(device, dtype, gemm_n, args.repeats)
    rows = []
    for path, changes in PATHS:
        if args.paths and path not in args.paths:
            continue
        if changes.get("compile") and args.skip_compile_reason:
            continue
        if device.type != "cuda" and (changes.get("cuda_graphs") or "attention" in changes):
            continue  # CUDA graphs and the flash/cuDNN kernels pinned: CUDA only
        for batch in args.batch_sizes:
            rows.append(measure_row(model, stream, device, args, path, changes, batch))
            with open(Path(args.out) / "partial.jsonl", "a") as f:  # kept if the run is cut
                f.write(json.dumps(rows[-1]) + "\n")
    naive_windows = min(args.windows, args.naive_windows)
    naive_s, naive = timed(device, lambda: naive_nll(model, stream, args.seqlen, naive_windows),
                           args.repeats)
    rows.append({"path": "naive loop", "batch_size": 1, "eval": None, "compile_s": None,
                 "seconds": naive_s, "tokens": naive_windows * args.seqlen, "nll": naive})
    # the rate before and after the passes (clocks move as the GPU warms): the higher one
    rate_after = matmul_rate(device, dtype, gemm_n, args.repeats)
    rate = max(rate_before, rate_after)
    fpt = flops_per_token(model, args.seqlen)
    for row in rows:
        if "seconds" in row:
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
            row["tflops"] = row["tokens_per_s"] * fpt / 1e12
            row["fraction"] = row["tokens_per_s"] * fpt / rate
    timed_rows = [r for r in rows if "fraction" in r]
    best = max(timed_rows, key=lambda r: r["fraction"])
    bounds = None
    if device.type == "cuda":
        cfg = EvalConfig(seqlen=args.seqlen, batch_size=best["batch_size"], **(best["eval"] or {}))
        tokens = best["batch_size"] * args.seqlen
        attention_fpt = 2 * model.config.num_hidden_layers * args.seqlen * model.config.hidden_size
        try:
            bounds = {"path": best["path"], "batch_size": best["batch_size"],
                      "profile": profile_pass(model, stream[:tokens], cfg, device),
                      "gemms": gemm_ceiling(model, tokens, device, dtype, rate, args.repeats),
                      "attention": attention_rates(model, best["batch_size"], args.seqlen,
                                                   device, dtype, args.repeats),
                      "flops_per_batch": fpt * tokens,
                      "matmul_flops_per_batch": (fpt - attention_fpt) * tokens}
        except Exception as e:  # noqa: BLE001 - the table above is worth keeping
            bounds = None
            print(f"bound analysis failed: {type(e).__name__}: {e}")
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or "cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": T.__version__, "dtype": str(dtype),
        "smoke": args.smoke, "params": sum(p.numel() for p in model.parameters()),
        "seqlen": args.seqlen, "batch_sizes": args.batch_sizes, "windows": args.windows,
        "naive_windows": naive_windows, "flops_per_token": fpt, "matmul_tflops": rate / 1e12,
        "matmul_tflops_before_after": [rate_before / 1e12, rate_after / 1e12],
        "inductor_cache": args.inductor_cache, "compile_skipped": args.skip_compile_reason,
        "rows": rows, "target_fraction": TARGET, "best_fraction": best["fraction"],
        "best_path": best["path"], "bounds": bounds,
    }


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
    p.add_argument("--batch-sizes", default="16", help="comma-separated windows per batch")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--naive-windows", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    p.add_argument("--warm-cache", action="store_true",
                   help="keep the user's Inductor cache (default: a fresh one, cold compile)")
    p.add_argument("--paths", help="';'-separated path names to run (default: all): "
                   + "; ".join(name for name, _ in PATHS))
    args = p.parse_args()
    args.paths = args.paths and [name.strip() for name in args.paths.split(";")]
    unknown = sorted(set(args.paths or ()) - {name for name, _ in PATHS})
    if unknown:
        p.error(f"unknown --paths {unknown}; allowed: {[name for name, _ in PATHS]}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.smoke:
        args.windows, args.naive_windows, args.repeats, args.seqlen = 8, 4, 1, 128
    compile_plan(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
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
