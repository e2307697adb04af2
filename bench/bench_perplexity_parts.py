"""Timing, the bound analysis and the table of bench/bench_perplexity.py (which see)."""

from __future__ import annotations

import re
import statistics
import time

import torch
import torch.nn.functional as F

from ptqscale.metrics import measure_perplexity
from ptqscale.metrics.chunked_head import HEAD_CHUNK_ELEMENTS

# kernel classes by name, first match wins (cuBLAS: nvjet/xmma/gemm; flash, cuDNN, xformers-
# style attention; Inductor's Triton kernels; the compiled loss is a Triton reduction over
# the logits, the eager one cunn_SoftMax/nll)
CLASSES = [("attention", r"flash|fmha|sdpa|attention|attn"),
           ("matmul", r"gemm|nvjet|xmma|cutlass|cublas|wgmma|s16816|splitk|aten::(add)?mm"),
           ("loss", r"log_softmax|logsumexp|nll|softmax|cross_entropy"),
           ("fused (Triton)", r"^triton"),
           ("other", r"")]


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


def kernel_class(name: str) -> str:
    return next(c for c, pattern in CLASSES if re.search(pattern, name, re.I))


def profile_pass(model, stream, cfg, device) -> dict:
    """GPU seconds of one pass over ``stream`` by kernel class, its wall seconds, and the gap
    (wall minus kernel time: launches and host work the GPU waited for)."""
    from torch.profiler import ProfilerActivity, profile

    measure_perplexity(model, stream, cfg)   # graphs compiled, kernels loaded
    sync(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        measure_perplexity(model, stream, cfg)
        sync(device)
        wall = time.perf_counter() - t0
    classes = {c: 0.0 for c, _ in CLASSES}
    top = []
    for evt in prof.key_averages():
        us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if us > 0:
            classes[kernel_class(evt.key)] += us / 1e6
            top.append((us / 1e6, evt.key[:90]))
    kernels = sum(classes.values())
    return {"wall_s": wall, "kernel_s": kernels, "gap_s": wall - kernels, "classes": classes,
            "top": sorted(top, reverse=True)[:12]}


def gemm_ceiling(model, tokens: int, device, dtype, rate: float, repeats: int) -> list[dict]:
    """Each GEMM of the pass timed alone: a decoder block's Linears at M = ``tokens`` (x layers)
    and the head at the chunked path's rows (x chunks); TFLOP/s and share of ``rate``."""
    from ptqscale.models import get_anatomy

    anat = get_anatomy(model)
    block = model.get_submodule(anat.block_prefix)[0]
    head = model.get_output_embeddings()
    chunk = min(tokens, max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0]))
    jobs = [(n, m.weight, tokens, len(anat.blocks)) for n, m in block.named_modules()
            if isinstance(m, torch.nn.Linear)]
    jobs.append(("lm_head (a chunk)", head.weight, chunk, -(-tokens // chunk)))
    out = []
    for name, w, rows, count in jobs:
        x = torch.randn(rows, w.shape[1], device=device, dtype=dtype)
        seconds, _ = timed(device, lambda x=x, w=w: F.linear(x, w), repeats)
        flops = 2 * rows * w.shape[0] * w.shape[1]
        out.append({"gemm": name, "m": rows, "n": w.shape[0], "k": w.shape[1], "count": count,
                    "seconds": seconds, "tflops": flops / seconds / 1e12,
                    "fraction": flops / seconds / rate, "total_s": seconds * count})
    return out


def attention_rates(model, batch: int, seqlen: int, device, dtype, repeats: int) -> list[dict]:
    """The model's causal attention (GQA) timed alone with each SDPA kernel, x layers."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = model.config
    d = c.hidden_size // c.num_attention_heads
    q = torch.randn(batch, c.num_attention_heads, seqlen, d, device=device, dtype=dtype)
    k = torch.randn(batch, c.num_key_value_heads, seqlen, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    flops = 2 * batch * c.num_attention_heads * seqlen**2 * d   # causal: half of 4 B H T^2 d
    out = []
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        def call():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                seconds, _ = timed(device, call, repeats)
        except RuntimeError as e:
            out.append({"kernel": name, "error": str(e).strip().splitlines()[0][:160]})
            continue
        out.append({"kernel": name, "seconds": seconds, "tflops": flops / seconds / 1e12,
                    "total_s": seconds * c.num_hidden_layers})
    return out


def _cell(v, fmt):
    return "-" if v is None else format(v, fmt)


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['path']} | {r['batch_size']} | failed: {r['error']} | | | | | | |"
    return (f"| {r['path']} | {r['batch_size']} | {_cell(r['compile_s'], '.1f')} | "
            f"{r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {r['fraction']:.1%} | "
            f"{r['nll']:.4f} | {_cell(r.get('peak_gib'), '.1f')} | {r.get('attention') or '-'} |")


def _bounds(r: dict) -> list[str]:
    b = r["bounds"]
    if not b:
        return []
    p, rate = b["profile"], r["matmul_tflops"] * 1e12
    lines = [f"## What bounds the rest ({b['path']}, batch {b['batch_size']})", "",
             f"One pass of {b['batch_size']} windows profiled: wall {p['wall_s'] * 1e3:.1f} ms, "
             f"GPU kernels {p['kernel_s'] * 1e3:.1f} ms, gap (launches, host work) "
             f"{p['gap_s'] * 1e3:.1f} ms.", "",
             "| kernel class | ms | share of wall |", "|---|---|---|"]
    lines += [f"| {c} | {s * 1e3:.1f} | {s / p['wall_s']:.1%} |" for c, s in p["classes"].items()]
    mm = p["classes"]["matmul"]
    lines += ["", f"The matmuls of the pass ({b['matmul_flops_per_batch'] / 1e12:.1f} TFLOP) run "
              f"at {b['matmul_flops_per_batch'] / mm / 1e12 if mm else float('nan'):.0f} TFLOP/s in "
              f"the pass, {b['matmul_flops_per_batch'] / mm / rate if mm else float('nan'):.1%} of "
              "the 8192^3 rate. Each GEMM alone:", "",
              "| GEMM | M | N | K | count | TFLOP/s | of the 8192^3 rate | ms in all |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {g['gemm']} | {g['m']} | {g['n']} | {g['k']} | {g['count']} | {g['tflops']:.0f} "
              f"| {g['fraction']:.1%} | {g['total_s'] * 1e3:.1f} |" for g in b["gemms"]]
    gemm_s = sum(g["total_s"] for g in b["gemms"])
    att = [a for a in b["attention"] if "seconds" in a]
    best_att = min((a["total_s"] for a in att), default=0.0)
    ceiling = b["flops_per_batch"] / (gemm_s + best_att) / rate
    lines += ["", "| attention kernel (alone, all layers) | TFLOP/s | ms in all |", "|---|---|---|"]
    lines += [f"| {a['kernel']} | {_cell(a.get('tflops'), '.0f')} | "
              f"{_cell(a.get('total_s') and a['total_s'] * 1e3, '.1f')}"
              f"{' (' + a['error'] + ')' if 'error' in a else ''} |" for a in b["attention"]]
    lines += ["", f"Ceiling of these shapes: the GEMMs alone ({gemm_s * 1e3:.1f} ms) plus the "
              f"fastest attention alone ({best_att * 1e3:.1f} ms), nothing else, would run at "
              f"{ceiling:.1%} of the matmul rate.", "", "Top kernels (s): " +
              "; ".join(f"{n} {s:.4f}" for s, n in p["top"]), ""]
    return lines


def markdown(r: dict) -> str:
    """The results table, and the bound analysis where the run profiled one."""
    skipped = f" Compiled rows skipped: {r['compile_skipped']}." if r["compile_skipped"] else (
        f" Compile seconds: first call minus steady state, Inductor cache {r['inductor_cache']}.")
    return "\n".join([
        f"# Perplexity throughput ({r['device']}, {r['date']})", "",
        f"torch {r['torch']}, transformers {r['transformers']}, {r['dtype']}, "
        f"{r['params'] / 1e9:.3f}B params, seqlen {r['seqlen']}, {r['windows']} windows "
        f"(naive loop: {r['naive_windows']}); {r['dtype']} matmul rate (8192^3, this run) "
        f"{r['matmul_tflops']:.1f} TFLOP/s (before and after the passes: "
        f"{' and '.join(f'{v:.1f}' for v in r['matmul_tflops_before_after'])}); model FLOPs/token {r['flops_per_token'] / 1e9:.2f} G. "
        f"Target fraction >= {r['target_fraction']:.0%}; best {r['best_fraction']:.1%} "
        f"({r['best_path']}).{skipped}", "",
        "| path | batch | compile s | tokens/s | TFLOP/s | fraction of matmul rate | NLL | "
        "peak GiB | attention |", "|---|---|---|---|---|---|---|---|---|",
        *[_row(row) for row in r["rows"]], "", *_bounds(r),
    ])
