"""Accuracy and cost of the landscape's cheaper second-order estimators, on the CPU (issue 23).

Usage::

    python bench/landscape_estimators_cpu.py --out bench/results             # every model
    python bench/landscape_estimators_cpu.py --out /tmp/x --models gutenberg-llama-200k

On real small models (the embedded gutenberg-llama-200k/500k/1m over Gutenberg validation
text, stories260K over TinyStories), at the landscape's HVP setting of the 1.2B run (one
window per product, graph rebuilt per product), it measures:

- trace: per-probe variance of the stratified scheme (probe k on window k mod B) against
  every probe on every window, with the same probes: ``r = var_stratified / var_all``; the
  stratified scheme is ``B`` times fewer window-products, so at equal variance it costs
  ``r / B`` of the v1 scheme;
- top eigenvalue: products to reach a relative error of 1e-2 / 1e-3 against a reference
  (Lanczos run to its end, fp32), for the power iteration and for Lanczos (same start), and
  what each returns at the default stop ``power_tol``;
- bf16: the same probes and start vector with the parameters in bf16 (fp32 logits, loss,
  probes and sums): per-sample and mean relative errors against fp32;
The same estimators against an exact Hessian are in tests/metrics/test_hessian_estimators.py.
Cost is counted in window-products (the unit of the 1.2B run, where each product rebuilds
its graph); the trace here retains each window's graph (same numbers, far fewer CPU seconds
on a shared 2-core machine), the eigenvalue runs one micro-batch of all windows. CPU seconds
are not a GPU proxy (bf16 has no fast CPU kernels here). The GPU command that measures the
1.2B target is in the results file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import lzma
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from ptqscale.metrics import hessian as hs
from ptqscale.metrics import hessian_estimators as est
from ptqscale.metrics.landscape import LandscapeConfig, _batch_hvps, _measuring
from ptqscale.metrics.second_order import _parameters_in
from ptqscale.models import ModelConfig, get_anatomy, load_model

DATA = Path("/work/shared/data")
ZOO = Path(__file__).resolve().parents[1] / "src" / "ptqscale" / "zoo" / "checkpoints"
FD_STEPS = (1e-4, 3e-5, 1e-5, 3e-6)  # fd_eps tried for the trace and the eigenvalue
MODELS = ("gutenberg-llama-200k", "gutenberg-llama-500k", "gutenberg-llama-1m", "stories260k")


def load(name: str, n_windows: int, seqlen: int):
    """``(model in fp32, its quantizable targets, windows [n, seqlen])`` on real text."""
    if name == "stories260k":
        path = DATA / "models" / "stories260K" / "stories260K.gguf"
        text = (DATA / "tinystories-valid-sample" / "tinystories_val.txt").read_text()[:60_000]
    else:
        path = ZOO / name
        with lzma.open(DATA / "gutenberg-en" / "valid.jsonl.xz", "rt") as f:
            text = json.loads(f.readline())["text"][5_000:80_000]  # past the boilerplate
    model, tok = load_model(ModelConfig(name=name, path=str(path), max_seqlen=512))
    ids = tok(text, return_tensors="pt").input_ids[0]
    assert ids.numel() >= n_windows * seqlen, (name, ids.numel())
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen).long()
    return model.eval(), get_anatomy(model).targets, windows  # fp32 inside the measurement


def trace_samples(model, targets, windows, cfg: LandscapeConfig) -> tuple[torch.Tensor, float]:
    """``([probes, L] samples, seconds)`` of ``cfg``'s scheme and dtype, as measure_hessian."""
    weights = [m.weight for m in targets.values()]
    with _measuring(model, targets) as ref, \
            hs.double_backward_ready(model, weights, eager=cfg.hvp == "autograd"), \
            _parameters_in(model, cfg.hvp_dtype):
        start = time.perf_counter()
        if cfg.hutchinson_scheme == "stratified":
            makes = [m for _, m in _batch_hvps(model, windows, weights, ref,
                                               replace(cfg, hvp_windows=1), cfg.hvp_retain_graph,
                                               trace=True)]
            s = est.stratified_hutchinson_samples(makes, weights, cfg.hutchinson_probes, cfg.seed)
        else:
            s = hs.hutchinson_samples(_batch_hvps(model, windows, weights, ref, cfg,
                                                  cfg.hvp_retain_graph, trace=True),
                                      weights, cfg.hutchinson_probes, cfg.seed)
        return s, time.perf_counter() - start


def eigen_history(model, targets, windows, cfg: LandscapeConfig, method: str, iters: int
                  ) -> tuple[list[float], float]:
    """Estimate after each product (tol 0: all ``iters``), and seconds per product."""
    weights = [m.weight for m in targets.values()]
    history: list[float] = []
    with _measuring(model, targets) as ref, \
            hs.double_backward_ready(model, weights, eager=cfg.hvp == "autograd"), \
            _parameters_in(model, cfg.hvp_dtype):
        full = hs.summed_hvp(_batch_hvps(model, windows, weights, ref, cfg, False), weights)
        start = time.perf_counter()
        if method == "lanczos":
            est.lanczos(full, weights, iters, 0.0, cfg.seed, history=history)
        else:  # the power iteration's Rayleigh quotient v.Hv of each unit iterate

            def recording(v):
                hv = full(v)
                history.append(float(hs.blockwise_dot(v, hv).sum()))
                return hv

            hs.power_iteration(recording, weights, iters, 0.0, cfg.seed)
        return history, (time.perf_counter() - start) / len(history)


def products_to(history: list[float], ref: float, rel: float) -> int | None:
    """First product count from which the estimate stays within ``rel`` of ``ref``."""
    ok = [abs(h - ref) <= rel * abs(ref) for h in history]
    for i in range(len(ok)):
        if all(ok[i:]):
            return i + 1
    return None


def stop_at(history: list[float], tol: float) -> tuple[int, float]:
    """Where the ``tol`` rule of power_iteration / lanczos stops: ``(products, estimate)``."""
    for i in range(1, len(history)):
        if abs(history[i] - history[i - 1]) <= tol * abs(history[i]):
            return i + 1, history[i]
    return len(history), history[-1]


def run_model(name: str, n_windows: int, seqlen: int, probes: int, bf16_probes: int,
              iters: int, bf16_iters: int) -> dict:
    model, targets, windows = load(name, n_windows, seqlen)
    n_params = sum(m.weight.numel() for m in targets.values())
    cfg = LandscapeConfig(max_tokens=10**6, hutchinson_probes=probes, hvp_retain_graph=True,
                          hvp_windows=n_windows)
    row = {"model": name, "target_params": n_params, "windows": n_windows, "seqlen": seqlen,
           "probes": probes}
    s_all, sec_all = trace_samples(model, targets, windows, cfg)
    s_str, sec_str = trace_samples(model, targets, windows,
                                   replace(cfg, hutchinson_scheme="stratified"))
    t_all, t_str = s_all.sum(1), s_str.sum(1)
    r = float(t_str.var() / t_all.var())
    row.update(trace_all=float(t_all.mean()), trace_all_sem=float(t_all.std() / probes**0.5),
               trace_strat=float(t_str.mean()), trace_strat_sem=float(t_str.std() / probes**0.5),
               r=r, cost_at_equal_variance=r / n_windows, sec_all=sec_all, sec_strat=sec_str)
    # bf16 against fp32, the same first probes (paired)
    sub = replace(cfg, hutchinson_probes=bf16_probes)
    s_bf, sec_bf = trace_samples(model, targets, windows, replace(sub, hvp_dtype="bfloat16"))
    ref = s_all[:bf16_probes]
    rel = (s_bf.sum(1) - ref.sum(1)).abs() / ref.sum(1).abs()
    row.update(bf16_trace_rel_err=float((s_bf.sum(1).mean() - ref.sum(1).mean()).abs()
                                        / ref.sum(1).mean().abs()),
               bf16_sample_rel_err_max=float(rel.max()),
               bf16_layer_rel_err_max=float(((s_bf.mean(0) - ref.mean(0)).abs()
                                             / ref.mean(0).abs().clamp_min(1e-30)).max()),
               sec_bf16_per_probe=sec_bf / bf16_probes, sec_fp32_per_probe=sec_all / probes)
    hist_l, sec_l = eigen_history(model, targets, windows, cfg, "lanczos", iters)
    hist_p, sec_p = eigen_history(model, targets, windows, cfg, "power", iters)
    top = hist_l[-1]  # reference: Lanczos run to the end in fp32
    row.update(top_ref=top, top_ref_last_change=abs(hist_l[-1] - hist_l[-2]) / abs(top),
               sec_per_product_power=sec_p, sec_per_product_lanczos=sec_l)
    for method, hist in (("power", hist_p), ("lanczos", hist_l)):
        for rel_err in (1e-2, 1e-3):
            row[f"{method}_products_{rel_err:g}"] = products_to(hist, top, rel_err)
        n_stop, value = stop_at(hist, cfg.power_tol)
        row[f"{method}_stop"], row[f"{method}_stop_err"] = n_stop, abs(value - top) / abs(top)
    hist_b, _ = eigen_history(model, targets, windows, replace(cfg, hvp_dtype="bfloat16"),
                              "lanczos", bf16_iters)
    n_stop, value = stop_at(hist_b, cfg.power_tol)
    row.update(lanczos_bf16_stop=n_stop, lanczos_bf16_err=abs(value - top) / abs(top))
    # finite differences of gradients (the model's own attention), the same probes: forward
    # differences for the trace, central for the trace and the eigenvalue
    fd = replace(cfg, hvp="finite_difference", hvp_retain_graph=False)
    for scheme in ("forward", "central"):
        s_fd, sec_fd = trace_samples(model, targets, windows, replace(fd, fd_trace=scheme))
        rel = (s_fd.sum(1) - s_all.sum(1)).abs() / s_all.sum(1).abs()
        row.update({f"fd_{scheme}_trace_rel_err": float(
                        (s_fd.sum(1).mean() - t_all.mean()).abs() / t_all.mean().abs()),
                    f"fd_{scheme}_sample_rel_err_max": float(rel.max()),
                    f"fd_{scheme}_layer_rel_err_max": float(
                        ((s_fd.mean(0) - s_all.mean(0)).abs()
                         / s_all.mean(0).abs().clamp_min(1e-30)).max()),
                    f"sec_fd_{scheme}_per_probe": sec_fd / probes})
    # the step: forward-difference trace and central-difference Lanczos at each fd_eps
    for eps in FD_STEPS:
        step = replace(fd, fd_eps=eps, fd_trace="forward")
        s_fd, _ = trace_samples(model, targets, windows, step)
        hist_fd, _ = eigen_history(model, targets, windows, step, "lanczos", iters)
        n_stop, value = stop_at(hist_fd, cfg.power_tol)
        row[f"fd_step_{eps:g}"] = {
            "trace_rel_err": float((s_fd.sum(1).mean() - t_all.mean()).abs() / t_all.mean().abs()),
            "layer_rel_err_max": float(((s_fd.mean(0) - s_all.mean(0)).abs()
                                        / s_all.mean(0).abs().clamp_min(1e-30)).max()),
            "lanczos_stop": n_stop, "lanczos_err": abs(value - top) / abs(top)}
    return row


def _f(x, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    lines = [f"# Landscape second-order estimators on the CPU ({report['device']})", "",
             f"{report['date']}, torch {report['torch']}; {report['setting']}", "",
             "## Trace: stratified (probe k on window k mod B) vs every probe on every window",
             "", "| model | target params | B | probes | tr all (sem) | tr stratified (sem) | "
             "r = var ratio | cost at equal variance (r/B) | CPU s all / stratified |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        lines.append(f"| {r['model']} | {r['target_params']} | {r['windows']} | {r['probes']} | "
                     f"{r['trace_all']:.4g} ({r['trace_all_sem']:.2g}) | {r['trace_strat']:.4g} "
                     f"({r['trace_strat_sem']:.2g}) | {r['r']:.2f} | {r['cost_at_equal_variance']:.2f}"
                     f" | {r['sec_all']:.1f} / {r['sec_strat']:.1f} |")
    lines += ["", "## Top eigenvalue: products to a relative error (reference: fp32 Lanczos, "
              "last step's change given)", "",
              "| model | reference | last change | power: 1e-2 / 1e-3 / stop@1e-4 (err) | "
              "Lanczos: 1e-2 / 1e-3 / stop@1e-4 (err) |", "|---|---|---|---|---|"]
    for r in report["models"]:
        lines.append(
            f"| {r['model']} | {r['top_ref']:.5g} | {r['top_ref_last_change']:.1e} | "
            f"{_f(r['power_products_0.01'])} / {_f(r['power_products_0.001'])} / "
            f"{r['power_stop']} ({r['power_stop_err']:.1e}) | {_f(r['lanczos_products_0.01'])} / "
            f"{_f(r['lanczos_products_0.001'])} / {r['lanczos_stop']} ({r['lanczos_stop_err']:.1e}) |")
    lines += ["", "## bf16 parameters (fp32 logits, loss, probes, sums) vs fp32, same probes", "",
              "| model | probes | trace rel err | max per-probe rel err | max per-layer rel err | "
              "Lanczos stop: products (rel err) | CPU s/probe fp32 / bf16 |",
              "|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        lines.append(f"| {r['model']} | {report['bf16_probes']} | {r['bf16_trace_rel_err']:.1e} | "
                     f"{r['bf16_sample_rel_err_max']:.1e} | {r['bf16_layer_rel_err_max']:.1e} | "
                     f"{r['lanczos_bf16_stop']} ({r['lanczos_bf16_err']:.1e}) | "
                     f"{r['sec_fp32_per_probe']:.2f} / {r['sec_bf16_per_probe']:.2f} |")
    rows = [r for r in report["models"] if "fd_forward_trace_rel_err" in r]
    if rows:
        lines += ["", "## Finite differences of gradients (fd_eps 1e-4, the model's own attention)"
                  " vs double backward, same probes", "",
                  "| model | probes | trace: forward / central rel err | max per-probe rel err: "
                  "forward / central | max per-layer rel err: forward / central |",
                  "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['probes']} | {r['fd_forward_trace_rel_err']:.1e} / "
                     f"{r['fd_central_trace_rel_err']:.1e} | "
                     f"{r['fd_forward_sample_rel_err_max']:.1e} / "
                     f"{r['fd_central_sample_rel_err_max']:.1e} | "
                     f"{r['fd_forward_layer_rel_err_max']:.1e} / "
                     f"{r['fd_central_layer_rel_err_max']:.1e} |")
    if rows:
        lines += ["", "## The finite-difference step: forward-difference trace (total / worst layer) "
                  "and central-difference Lanczos (products at the 1e-4 stop, error) against "
                  "double backward", "", "| model | " + " | ".join(
                      f"fd_eps {e:g}" for e in FD_STEPS) + " |", "|---|" + "---|" * len(FD_STEPS)]
    for r in rows:
        cells = [r[f"fd_step_{e:g}"] for e in FD_STEPS]
        lines.append(f"| {r['model']} | " + " | ".join(
            f"tr {c['trace_rel_err']:.1e} / {c['layer_rel_err_max']:.1e}; eig {c['lanczos_stop']}"
            f" ({c['lanczos_err']:.1e})" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--bf16-probes", type=int, default=4)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--bf16-iters", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": platform.processor() or platform.machine(), "torch": torch.__version__,
              "setting": f"{args.windows} windows x {args.seqlen} tokens, fp32 unless said, "
                         f"trace: each window's graph retained, eigenvalue: one micro-batch of all windows, "
                         f"seed 0",
              "bf16_probes": args.bf16_probes, "models": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        report["models"].append(run_model(name, args.windows, args.seqlen, args.probes,
                                          args.bf16_probes, args.iters, args.bf16_iters))
        print(report["models"][-1], flush=True)
        (args.out / "landscape_estimators_cpu.json").write_text(json.dumps(report, indent=1))
        (args.out / "landscape_estimators_cpu.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
