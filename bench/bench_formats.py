"""fake_quantize throughput of every study format, against device-to-device copy bandwidth.

    python bench/bench_formats.py --out DIR            # CUDA: 4096x4096 and 8192x28672 bf16
    python bench/bench_formats.py --out DIR --smoke    # tiny sizes (CPU is fine)

GB/s = (bytes read + bytes written) / time = 2 * numel * 2 bytes (bf16 in, bf16 out) / time,
the same accounting as ``y.copy_(x)``, whose bandwidth is measured in the same run. A time is the
median over ``--repeats`` samples (after ``--warmup`` calls) of one sample's ``--inner``
back-to-back calls / inner (CUDA events on GPU). Per format: the torch reference
(``kernel="torch"``), the fused Triton kernel (``fake_quantize``'s CUDA default, every quantized
format but ``int*_t_asym``: formats/kernels.py, also replayed from a CUDA graph to show the
device time without the host's launch cost) and, on CUDA (or with ``--compile``), the
reference under ``torch.compile`` (dynamo reset per format; ``fullgraph=True``, falling back to graph breaks, and to eager if
compiling fails; the outcome is recorded). Kernel and compiled results are compared bitwise
with the reference; Inductor's Triton ``/`` is approximate (div.full.f32) unless
``eager_numerics.division_rounding`` is on, which this script turns on unless
``--approx-division`` is given. Writes
DIR/bench_formats.md and DIR/bench_formats.json (device, date, torch version, every number).
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

from ptqscale.formats import get_format, kernels

FORMATS = ["bf16", "int8", "int4_g128", "int3_g128", "int4_g128_asym", "fp8_e4m3", "mxfp8_e4m3",
           "mxfp6_e2m3", "mxfp4", "mxint8", "mxint4_b32", "mxint3_b128", "nvfp4", "nf4"]
SHAPES = [(4096, 4096), (8192, 28672)]
SMOKE_SHAPES = [(64, 256), (96, 200)]
TARGET = 0.75  # issue 23: every quantized format's best path at >= 75% of copy bandwidth


def timer(device: torch.device, fn, warmup: int, repeats: int, inner: int = 1) -> float:
    """Median seconds per fn() call; each sample times ``inner`` back-to-back calls (CUDA
    events on GPU, perf_counter on CPU), so a call's CPU launch cost counts as it does in a
    loop over a model's weights, without one event pair per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def graph_timer(fn, inner: int, repeats: int) -> float | None:
    """Median seconds per fn() with ``inner`` calls captured in one CUDA graph and replayed:
    the device's time alone, without the host's launch cost (None if capture fails)."""
    try:
        fn()  # compiled and tuned outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        graph.replay()
        return timer(torch.device("cuda"), graph.replay, 2, repeats) / inner
    except Exception as err:  # noqa: BLE001 - a diagnostic column; the run goes on
        print(f"  graph capture failed: {type(err).__name__}: {err}", flush=True)
        return None


def compile_fn(fn, x):
    """torch.compile(fn): fullgraph first, then with graph breaks; (compiled or None, status)."""
    import torch._dynamo

    for fullgraph in (True, False):
        torch._dynamo.reset()
        try:
            compiled = torch.compile(fn, fullgraph=fullgraph, dynamic=False)
            compiled(x)
            return compiled, "fullgraph" if fullgraph else "graph breaks"
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
            status = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return None, status


def bench_shape(shape, names, device, args) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    moved = 2 * x.numel() * x.element_size()  # bytes read + written
    y = torch.empty_like(x)
    t = dict(warmup=args.warmup, repeats=args.repeats, inner=args.inner)
    copy_s = timer(device, lambda: y.copy_(x), **t)
    copy_graph_s = (graph_timer(lambda: y.copy_(x), args.inner, args.repeats)
                    if device.type == "cuda" else None)
    ref_t = dict(warmup=1, repeats=args.ref_repeats, inner=1)
    rows = []
    for name in names:
        fmt = get_format(name)
        ref = fmt.fake_quantize(x, kernel="torch")
        row = {"shape": list(shape), "format": name, "family": fmt.family,
               "copy_gbps": moved / copy_s / 1e9,
               "torch_gbps": moved / timer(device, lambda f=fmt: f.fake_quantize(x, kernel="torch"),
                                           **ref_t) / 1e9}
        if copy_graph_s:
            row["copy_graph_gbps"] = moved / copy_graph_s / 1e9
        if kernels.available() and kernels.kernel_spec(fmt) is not None and device.type == "cuda":
            try:
                bench_kernel(row, fmt, x, ref, moved, args, t)
            except Exception as err:  # noqa: BLE001 - recorded; the other formats still run
                row["kernel_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                print(f"  kernel failed: {row['kernel_error']}", flush=True)
        if args.compile:
            compiled, row["compile"] = compile_fn(
                lambda v, f=fmt: f.fake_quantize(v, kernel="torch"), x)
            if compiled is not None:
                row["compiled_gbps"] = moved / timer(device, lambda c=compiled: c(x), **t) / 1e9
                row["compiled_mismatch_frac"] = (compiled(x) != ref).float().mean().item()
        best = max(row[k] for k in ("torch_gbps", "kernel_gbps", "compiled_gbps") if k in row)
        row["best_frac_of_copy"] = best / row["copy_gbps"]
        row["meets_target"] = (row["best_frac_of_copy"] >= TARGET
                               if fmt.family != "baseline" else None)
        rows.append(row)
        print(f"{shape} {name:16s} torch {row['torch_gbps']:8.1f}  kernel "
              f"{row.get('kernel_gbps', float('nan')):8.1f}  compiled "
              f"{row.get('compiled_gbps', float('nan')):8.1f}  copy {row['copy_gbps']:8.1f} GB/s",
              flush=True)
    return rows


def bench_kernel(row: dict, fmt, x: torch.Tensor, ref: torch.Tensor, moved: int, args, t) -> None:
    """The fused kernel's columns of ``row``: throughput (stream and CUDA graph), the tuned
    launch configuration, and the fraction of elements that differ from the reference."""
    got = fmt.fake_quantize(x)  # first call: compiles and tunes
    row["kernel_mismatch_frac"] = (got != ref).float().mean().item()
    chosen = kernels.CHOSEN.get((fmt, *x.shape, x.dtype, x.device.index))
    row["kernel_config"] = None if chosen is None else {
        "kernel": chosen[0], "grid": list(chosen[1]), "warps": chosen[3],
        **{k: chosen[2][k] for k in ("G", "CW", "CHUNK", "BLOCK_R", "PARTS") if k in chosen[2]}}
    row["kernel_gbps"] = moved / timer(x.device, lambda: fmt.fake_quantize(x), **t) / 1e9
    graph_s = graph_timer(lambda: fmt.fake_quantize(x), args.inner, args.repeats)
    if graph_s:
        row["kernel_graph_gbps"] = moved / graph_s / 1e9


def _same(row: dict, key: str) -> str:
    if key not in row:
        return "-"
    return "yes" if row[key] == 0 else f"{row[key]:.2e} differ"


def _gbps(row: dict, key: str) -> str:
    return f"{row[key]:.1f}" if row.get(key) else "-"


def render(meta: dict, rows: list[dict]) -> str:
    out = [f"# fake_quantize throughput ({meta['device']})", "",
           f"Date {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, {meta['note']}, "
           f"compiled with exact division: {meta['exact_division']}. GB/s = 2 x bytes of the "
           f"bf16 tensor / median time per call ({meta['inner']} calls back to back per sample, "
           f"{meta['repeats']} samples); copy = `y.copy_(x)` timed the same way in the same run. "
           "Columns: the torch reference (eager, "
           f"{meta['ref_repeats']} single calls), the fused Triton kernel (`fake_quantize`'s "
           "default on CUDA), the reference under torch.compile; best / copy is the best of "
           "these against copy. The graph columns replay the same calls captured in one CUDA "
           "graph (device time alone, without the host's launch cost), kernel against copy. "
           f"Target: every quantized format >= {TARGET:.0%} of copy.", "",
           "| shape | format | torch GB/s | kernel GB/s | compiled GB/s | copy GB/s | best / copy "
           "| target | kernel == torch | compiled == torch | kernel graph GB/s "
           "| copy graph GB/s | graph kernel / copy | kernel config |",
           "|---|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        target = {True: "met", False: "MISSED", None: "n/a"}[r["meets_target"]]
        graph = (f"{r['kernel_graph_gbps'] / r['copy_graph_gbps']:.0%}"
                 if r.get("kernel_graph_gbps") and r.get("copy_graph_gbps") else "-")
        cfg = r.get("kernel_config") or {}
        cfg = " ".join(f"{k}={v}" for k, v in cfg.items() if k != "grid") or r.get("kernel_error", "-")
        out.append(f"| {r['shape'][0]}x{r['shape'][1]} | `{r['format']}` | {r['torch_gbps']:.1f} | "
                   f"{_gbps(r, 'kernel_gbps')} | {_gbps(r, 'compiled_gbps')} | "
                   f"{r['copy_gbps']:.1f} | {r['best_frac_of_copy']:.0%} | "
                   f"{target} | {_same(r, 'kernel_mismatch_frac')} | "
                   f"{_same(r, 'compiled_mismatch_frac')} | {_gbps(r, 'kernel_graph_gbps')} | "
                   f"{_gbps(r, 'copy_graph_gbps')} | {graph} | {cfg} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats")
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time torch.compile (default: on CUDA only)")
    ap.add_argument("--approx-division", action="store_true",
                    help="let compiled kernels use Triton's approximate fp32 division")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--inner", type=int, default=10, help="calls per timed sample")
    ap.add_argument("--ref-repeats", type=int, default=5,
                    help="single-call samples of the (slow) eager torch reference")
    args = ap.parse_args(argv)
    names = [get_format(n).name for n in args.formats]  # bad names fail before any work
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.smoke else 20)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.eager_numerics.division_rounding = not args.approx_division
    rows = [r for s in shapes for r in bench_shape(s, names, device, args)]
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "note": "smoke run (tiny shapes)" if args.smoke else f"shapes {shapes}",
            "triton": getattr(kernels.triton, "__version__", None), "inner": args.inner,
            "warmup": args.warmup, "repeats": args.repeats, "compile": args.compile,
            "ref_repeats": args.ref_repeats,
            "exact_division": args.compile and not args.approx_division}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_formats.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "bench_formats.md").write_text(render(meta, rows))
    print(f"wrote {args.out / 'bench_formats.md'}")


if __name__ == "__main__":
    main()
