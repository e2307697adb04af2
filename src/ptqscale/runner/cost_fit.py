"""Fitting the GPU cost model (runner/cost.py describes it): the measurements of the bench
files and the store's GPU records as :class:`Point` s, the fit per group, the command line::

    python -m ptqscale.runner.cost --fit bench/results --results results \\
        --tokenizers ../shared/data/tokenizers
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptqscale.runner.cost import COST_MODEL, GIB, MAX_EXTRAPOLATION, precision_of, predict


@dataclass
class Point:
    """One measured stage: where it came from and what it cost."""

    source: str
    device: str
    date: str
    stage: str
    placement: str      # one | streamed
    precision: str      # 16-bit | fp32 (the model's dtype)
    n_params: float
    work: float
    seconds: float
    peak_gib: float | None = None



# -- data -------------------------------------------------------------------------------------
def bench_points(folder: str | Path) -> list[Point]:
    """The points of the benchmark files in ``folder`` (runs with a GPU memory cap left out)."""
    folder, points = Path(folder), []
    for path in sorted(folder.glob("streaming_*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        run, src = _run_line(lines), path.name
        cfg, n = run["config"], float(run["params"])
        if cfg.get("max_gpu_memory"):
            continue
        for m in lines[1:]:
            if m.get("status") != "ok":
                continue
            base = dict(source=src, device=run["device"], date=run["date"], placement=m["placement"],
                        precision=precision_of(m["dtype"]), n_params=n, peak_gib=m.get("peak_gib"))
            stage = m["stage"]
            if stage.startswith("ppl"):
                points.append(Point(stage="eval", work=n * m["tokens"], seconds=m["seconds"], **base))
            elif stage == "rtn":
                points.append(Point(stage="rtn", work=n, seconds=m["seconds"], **base))
            elif stage == "gptq":
                points.append(Point(stage="gptq", work=n * cfg["nsamples"] * cfg["seqlen"],
                                    seconds=m["seconds"], **base))
            elif stage in ("noise", "hessian"):
                points += _landscape_points(m, n, cfg["landscape_tokens"], base)
    points += _bench_json_points(folder)
    return points


def _landscape_points(m: dict, n: float, tokens: int, base: dict) -> list[Point]:
    """Noise and Hessian points of a landscape measurement (bench line or record)."""
    out = []
    if m.get("cost_noise_response_tokens"):
        out.append(Point(stage="noise", work=n * m["cost_noise_response_tokens"],
                         seconds=m["cost_noise_response_s"], **base))
    seconds = (m.get("cost_hessian_trace_s") or 0) + (m.get("cost_top_eigenvalue_s") or 0)
    if m.get("hvp_method") == "finite_difference":   # its own rate: gradients, no double backward
        grads = (m.get("cost_hessian_trace_tokens") or 0) + (m.get("cost_top_eigenvalue_tokens") or 0)
        if grads:
            out.append(Point(stage="hessian_fd", work=n * grads, seconds=seconds, **base))
        return out
    hvps = (m.get("cost_hessian_trace_hvps") or 0) + (m.get("cost_top_eigenvalue_hvps") or 0)
    if hvps:
        out.append(Point(stage="hessian", work=n * hvps * tokens, seconds=seconds, **base))
    return out


def _bench_json_points(folder: Path) -> list[Point]:
    points = []
    gptq = folder / "bench_gptq.json"
    if gptq.is_file():
        d = json.loads(gptq.read_text())
        env = d["environment"]
        for r in d["rows"]:
            if r["part"] == "timing" and r["method"] == "ptqscale":
                points.append(Point("bench_gptq.json", env["device"], env["date"], "gptq", "one",
                                    "16-bit", r["params"], r["params"] * r["nsamples"] * r["seqlen"],
                                    r["seconds"], r["peak_gib"]))
    ppl = folder / "bench_perplexity.json"
    if ppl.is_file():
        d = json.loads(ppl.read_text())
        for r in d["rows"]:
            if r["path"] == "eager":   # eval.compile=false, the default; compiled is another setting
                points.append(Point("bench_perplexity.json", d["device"], d["date"], "eval", "one",
                                    precision_of(d["dtype"].split(".")[-1]), d["params"],
                                    d["params"] * r["tokens"], r["seconds"]))
    for path in sorted(folder.glob("bench_landscape_*.json")):
        d = json.loads(path.read_text())
        n, feats = float(d["n_params"]), d["features"]
        hessian = "hessian_fd" if d["budget"].get("hvp") == "finite_difference" else "hessian"
        stages = {"baseline": "eval", "noise": "noise", "trace": hessian, "eigen": hessian}
        for name, f in feats.items():
            if name not in stages:   # the directional profile is not a stage of a job
                continue
            # trace/eigen: "tokens" counts every HVP's tokens (autograd) or every gradient's
            # (finite differences), as the stage's work does
            points.append(Point(path.name, d["device"], d["date"], stages[name], "one", "16-bit",
                                n, n * f["tokens"], f["seconds"], f.get("peak_gib")))
    return points


def record_points(results: str | Path) -> list[Point]:
    """The points of the store's complete GPU records (every study under ``results``)."""
    points = []
    for path in sorted(Path(results).glob("*/records/*.json")):
        r = json.loads(path.read_text())
        env = r.get("env", {})
        if r.get("status") != "complete" or not str(env.get("device", "")).startswith("cuda"):
            continue
        n, t, m = float(r["params"]["total"]), r["timings"], r["metrics"]
        base = dict(source=f"records/{r['study']}", device=env.get("device_name", env["device"]),
                    date=r["created_at"], placement="one",
                    precision=precision_of(r["model"]["dtype"]), n_params=n)
        points.append(Point(stage="eval", work=n * m["tokens"], seconds=t["eval"], **base))
        if not m.get("fp_cached") and t.get("fp_eval", 0) > 0.05:   # computed, not read back
            points.append(Point(stage="eval", work=n * m["tokens"], seconds=t["fp_eval"], **base))
        q = r.get("quantization") or {}
        cost, method = q.get("cost"), r["method"]["name"]
        if cost and method != "none":
            calib = q.get("calibration") or {}
            work = n * calib["nsamples"] * calib["seqlen"] if calib else n
            points.append(Point(stage=method, work=work, seconds=cost["seconds"],
                                peak_gib=cost["peak_memory_bytes"] / GIB, **base))
        land = r.get("landscape") or {}
        if t.get("landscape", 0) > 1.0 and "cost_noise_response_s" in land:   # computed here
            points += _landscape_points(land, n, land["landscape_tokens"], base)
    return points

# -- fit --------------------------------------------------------------------------------------
def _nnls_relative(x: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative coefficients minimising sum ((x . c - y) / y)^2."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.asarray(x, dtype=float) / np.asarray(y, dtype=float)[:, None]
    scale = np.maximum(np.abs(a).max(axis=0), 1e-300)   # columns of ~1 for a stable solve
    coef, _ = nnls(a / scale, np.ones(len(y)))
    return (coef / scale).tolist()


def fit(points: list[Point], gpu_gib: float | None = None) -> dict:
    """The cost model of ``points``: per (stage, placement, precision) group, time and memory.

    ``gpu_gib``: the memory of the GPU that decides "needs streaming" (the H200's, as torch
    reported it in the streaming bench: :func:`h200_gib`)."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(f"{p.stage}|{p.placement}|{p.precision}", []).append(p)
    model: dict[str, Any] = {"groups": {}, "max_extrapolation": MAX_EXTRAPOLATION}
    for key, pts in sorted(groups.items()):
        sizes = [p.n_params for p in pts]
        if max(sizes) >= 2 * min(sizes):
            a, b = _nnls_relative([[1.0, p.work] for p in pts], [p.seconds for p in pts])
        else:   # one size: a constant and a rate are not told apart; the rate is what scales
            a, (b,) = 0.0, _nnls_relative([[p.work] for p in pts], [p.seconds for p in pts])
        g = {"seconds": [a, b], "points": len(pts), "max_params": max(p.n_params for p in pts),
             "min_params": min(p.n_params for p in pts),
             "devices": sorted({p.device for p in pts}), "sources": sorted({p.source for p in pts}),
             "dates": [min(p.date for p in pts)[:10], max(p.date for p in pts)[:10]]}
        mem = [p for p in pts if p.peak_gib]
        if mem and max(p.n_params for p in mem) >= 2 * min(p.n_params for p in mem):
            g["peak_gib"] = _nnls_relative([[1.0, p.n_params] for p in mem], [p.peak_gib for p in mem])
        elif mem:   # one size: the weights held (none when streamed) + the rest, a constant
            per_param = _weight_gib_per_param(mem[0])
            rest = sum(p.peak_gib - per_param * p.n_params for p in mem) / len(mem)
            g["peak_gib"] = [max(rest, 0.0), per_param]
            g["peak_points"] = len(mem)
        model["groups"][key] = g
    model["gpu"] = {"name": "NVIDIA H200", "gib": gpu_gib}
    model["devices"] = sorted({p.device for p in points})
    model["dates"] = [min(p.date for p in points)[:10], max(p.date for p in points)[:10]]
    model["points"] = len(points)
    return model


# Bytes per parameter a stage holds on the GPU in one piece beyond its activations, for groups
# measured at one size: the landscape runs on an fp32 copy (noise: the weights; Hessian: the
# weights and 4 target-sized fp32 vectors, probe, gradient, product, accumulator:
# docs/landscape.md "HVP memory"); every other stage holds the model in its dtype.
HELD_FP32_COPIES = {"noise": 1, "hessian": 5}


def _weight_gib_per_param(p: Point) -> float:
    if p.placement == "streamed":
        return 0.0
    if p.stage in HELD_FP32_COPIES:
        return 4 * HELD_FP32_COPIES[p.stage] / GIB
    return (4 if p.precision == "fp32" else 2) / GIB


def _run_line(lines: list[dict]) -> dict:
    """A bench file's run description: its first line, after any --mmap save/load lines."""
    return next(line for line in lines if line.get("kind") == "run")


def h200_gib(folder: str | Path) -> float | None:
    """The H200's memory as torch reported it in the streaming bench (not typed in)."""
    for path in sorted(Path(folder).glob("streaming_*.jsonl")):
        run = _run_line([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        if "H200" in run.get("device", "") and run.get("gpu_total_gib"):
            return float(run["gpu_total_gib"])
    return None

def tokens_per_char(tokenizers: str | Path) -> dict:
    """Tokens per character of the embedded WikiText-2 test under the offline GPT-2 BPE
    (``tokenizers/gpt2/``: encoder.json, vocab.bpe)."""
    from ptqscale.data.corpora import DataConfig, join_documents, load_documents

    wiki = Path(__file__).resolve().parents[1] / "assets" / "data" / "wikitext-2-raw"
    cfg = DataConfig(name="wikitext2", split="test", path=str(wiki))
    text = join_documents(cfg, load_documents(cfg))
    out: dict[str, Any] = {"corpus": "wikitext2 test (embedded)", "chars": len(text)}
    folder = Path(tokenizers)
    if not (folder / "gpt2" / "encoder.json").is_file():
        raise SystemExit(f"--tokenizers {folder}: no gpt2/encoder.json (GPT-2 BPE) there")
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(str(folder / "gpt2" / "encoder.json"),
                                str(folder / "gpt2" / "vocab.bpe"))
    out["gpt2"] = len(tok.encode(text).ids) / len(text)
    return out

# -- command line -----------------------------------------------------------------------------
def fit_files(bench: str | Path, results: str | Path | None,
              tokenizers: str | Path | None = None) -> dict:
    """The cost model of the bench folder (and the store's GPU records under ``results``;
    tokens per character measured with the offline tokenizers in ``tokenizers``)."""
    points = bench_points(bench) + (record_points(results) if results else [])
    if not points:
        raise SystemExit(f"no benchmark points in {bench}")
    model = fit(points, h200_gib(bench))
    if tokenizers:
        model["tokens_per_char"] = tokens_per_char(tokenizers)
    model["fitted_from"] = {"bench": str(bench), "results": str(results) if results else None,
                            "tokenizers": str(tokenizers) if tokenizers else None}
    return model


def residuals(model: dict, points: list[Point]) -> list[tuple[Point, float]]:
    """(point, predicted / measured seconds) of each point under ``model``."""
    out = []
    for p in points:
        group = model["groups"][f"{p.stage}|{p.placement}|{p.precision}"]
        out.append((p, predict(group, p.work, p.n_params)[0] / p.seconds))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptqscale.runner.cost",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--fit", metavar="BENCH_DIR", required=True,
                        help="folder of the benchmark results (bench/results)")
    parser.add_argument("--results", metavar="DIR", help="store whose GPU records join the fit")
    parser.add_argument("--tokenizers", metavar="DIR",
                        help="offline tokenizers with gpt2/ (../shared/data/tokenizers): the "
                        "tokens per character of a whole corpus")
    parser.add_argument("--out", default=str(COST_MODEL), help=f"default: {COST_MODEL}")
    args = parser.parse_args(argv)
    model = fit_files(args.fit, args.results, args.tokenizers)
    Path(args.out).write_text(json.dumps(model, indent=1, sort_keys=True) + "\n")
    points = bench_points(args.fit) + (record_points(args.results) if args.results else [])
    print(f"{len(points)} points from {', '.join(model['devices'])} "
          f"({model['dates'][0]}..{model['dates'][1]}) -> {args.out}")
    print(f"{'stage|placement|precision':34} {'pts':>4} {'a s':>8} {'s/(work)':>10} "
          f"{'max N':>8} {'median pred/meas':>17} {'worst':>6}")
    by_group: dict[str, list[float]] = {}
    for p, ratio in residuals(model, points):
        by_group.setdefault(f"{p.stage}|{p.placement}|{p.precision}", []).append(ratio)
    for key, g in model["groups"].items():
        r = sorted(by_group[key])
        worst = max(max(r), 1 / min(r))
        print(f"{key:34} {g['points']:>4} {g['seconds'][0]:>8.3g} {g['seconds'][1]:>10.3g} "
              f"{g['max_params'] / 1e9:>7.3g}B {r[len(r) // 2]:>17.2f} {worst:>6.2f}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
