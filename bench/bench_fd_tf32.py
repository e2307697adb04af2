"""TF32 in the finite-difference Hessian trace: its error against fp32, and its speed (issue 23).

    python bench/bench_fd_tf32.py --out DIR [--probes 8] [--big-probes 2]

The landscape's fp32 gradients run at about half the GPU's fp32 peak (session 11,
bench_landscape_fd_h200.md); TF32 matmuls are the next lever, if their rounding (10-bit
mantissa products) survives the finite difference ``(g(W + eps v) - g(W)) / eps``. Measured,
with ``torch.backends.cuda.matmul.allow_tf32`` (and cuDNN's) off and on:

- error: the forward-difference trace (``fd_trace=forward``, ``fd_eps`` 1e-4) of the embedded
  trained models gutenberg-llama-200k/500k/1m over 8 windows x 256 tokens of Gutenberg
  validation text, same probes; TF32 and fp32 against double backward in fp32 (the reference),
  per trace and per layer;
- speed: one forward-difference probe of the random 1.24B Llama of bench_landscape.py over one
  2048-token window, fp32 against TF32 (after a warm-up probe).

Writes DIR/fd_tf32.{json,md}. Needs CUDA (TF32 is a GPU rounding mode).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import lzma
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from bench_landscape import build  # bench/ is the script's folder, on sys.path
from landscape_estimators_cpu import ZOO, trace_samples

from ptqscale.metrics.landscape import LandscapeConfig
from ptqscale.models import ModelConfig, get_anatomy, load_model

TEXT = Path(__file__).resolve().parents[1] / "src" / "ptqscale" / "assets" / "data" / \
    "gutenberg-en" / "valid.jsonl.xz"
MODELS = ("gutenberg-llama-200k", "gutenberg-llama-500k", "gutenberg-llama-1m")


@contextmanager
def tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def accuracy(name: str, probes: int, device) -> dict:
    with lzma.open(TEXT, "rt") as f:
        text = json.loads(f.readline())["text"][5_000:80_000]
    model, tok = load_model(ModelConfig(name=name, path=str(ZOO / name), max_seqlen=512))
    model = model.to(device).eval()
    windows = tok(text, return_tensors="pt").input_ids[0][: 8 * 256].view(8, 256).to(device)
    targets = get_anatomy(model).targets
    cfg = LandscapeConfig(hessian=True, hutchinson_probes=probes, hvp_retain_graph=False)
    fd = replace(cfg, hvp="finite_difference", fd_trace="forward")
    with tf32(False):
        ref, _ = trace_samples(model, targets, windows, cfg)          # double backward, fp32
        s32, _ = trace_samples(model, targets, windows, fd)
    with tf32(True):
        s_tf, _ = trace_samples(model, targets, windows, fd)
    tr = [float(s.sum(dim=1).mean()) for s in (ref, s32, s_tf)]
    layers = [s.mean(dim=0) for s in (ref, s32, s_tf)]
    return {"model": name, "probes": probes, "trace_autograd": tr[0], "trace_fd_fp32": tr[1],
            "trace_fd_tf32": tr[2],
            "fd_fp32_rel_err": abs(tr[1] - tr[0]) / abs(tr[0]),
            "fd_tf32_rel_err": abs(tr[2] - tr[0]) / abs(tr[0]),
            "tf32_vs_fp32_rel": abs(tr[2] - tr[1]) / abs(tr[1]),
            "layer_fd_fp32_max_rel": rel(layers[1], layers[0]),
            "layer_fd_tf32_max_rel": rel(layers[2], layers[0]),
            "probe_tf32_vs_fp32_max_rel": rel(s_tf.sum(dim=1), s32.sum(dim=1))}


def speed(probes: int, device) -> dict:
    model, targets, stream = build("1b", device, torch.bfloat16)
    windows = stream[:1]
    fd = LandscapeConfig(hessian=True, hutchinson_probes=probes, hvp_retain_graph=False,
                         hvp="finite_difference", fd_trace="forward", seqlen=windows.shape[1])
    out = {"params": sum(p.numel() for p in model.parameters()), "tokens": windows.numel(),
           "probes": probes}
    for label, on in (("fp32", False), ("tf32", True), ("fp32_again", False)):
        with tf32(on):
            trace_samples(model, targets, windows, replace(fd, hutchinson_probes=1))  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            s, _ = trace_samples(model, targets, windows, fd)
            torch.cuda.synchronize()
            out[f"{label}_s_per_probe"] = (time.perf_counter() - start) / probes
            out[f"{label}_trace"] = float(s.sum(dim=1).mean())
    out["speedup"] = out["fp32_s_per_probe"] / out["tf32_s_per_probe"]
    return out


def markdown(r: dict) -> str:
    lines = [f"# TF32 in the forward-difference Hessian trace ({r['device']})", "",
             f"{r['date']}, torch {r['torch']}. Command: `python bench/bench_fd_tf32.py --out DIR "
             f"--probes {r['probes']} --big-probes {r['speed']['probes']}`.", "",
             "## Error (embedded trained models, 8 x 256 Gutenberg validation tokens, same probes; "
             "reference: double backward, fp32)", "",
             "| model | trace (autograd) | FD fp32 rel err | FD TF32 rel err | TF32 vs fp32 | "
             "max layer rel err fp32 / TF32 | max probe TF32 vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for a in r["accuracy"]:
        lines.append(f"| {a['model']} | {a['trace_autograd']:.4g} | {a['fd_fp32_rel_err']:.2e} | "
                     f"{a['fd_tf32_rel_err']:.2e} | {a['tf32_vs_fp32_rel']:.2e} | "
                     f"{a['layer_fd_fp32_max_rel']:.2e} / {a['layer_fd_tf32_max_rel']:.2e} | "
                     f"{a['probe_tf32_vs_fp32_max_rel']:.2e} |")
    s = r["speed"]
    lines += ["", f"## Speed (random Llama, {s['params'] / 1e9:.2f}B parameters, one window of "
              f"{s['tokens']} tokens, {s['probes']} probes after a warm-up)", "",
              "| fp32 s/probe | TF32 s/probe | fp32 again | speed-up |", "|---|---|---|---|",
              f"| {s['fp32_s_per_probe']:.3f} | {s['tf32_s_per_probe']:.3f} | "
              f"{s['fp32_again_s_per_probe']:.3f} | {s['speedup']:.2f}x |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--big-probes", type=int, default=2)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device: TF32 is a GPU rounding mode")
    device = torch.device("cuda")
    r = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
         "device": torch.cuda.get_device_name(), "torch": torch.__version__,
         "probes": args.probes, "accuracy": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in MODELS:   # the JSON after each step: a cut-off run keeps what it measured
        r["accuracy"].append(accuracy(name, args.probes, device))
        print(r["accuracy"][-1], flush=True)
        (args.out / "fd_tf32.json").write_text(json.dumps(r, indent=1))
    r["speed"] = speed(args.big_probes, device)
    print(r["speed"], flush=True)
    (args.out / "fd_tf32.json").write_text(json.dumps(r, indent=1))
    (args.out / "fd_tf32.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
