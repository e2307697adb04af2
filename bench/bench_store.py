"""The store and the plan at study scale: 10^5 synthetic records and a 10^5-job sweep.

    python bench/bench_store.py --out DIR            # 10^5 jobs (a few minutes, mostly writing)
    python bench/bench_store.py --out DIR --smoke    # 2,000 jobs

The sweep: 4 models (stories260k and the three embedded gutenberg-llama sizes) x 2 methods
(rtn, gptq) x 25 formats x as many seeds as make ``--jobs``. Steps, each timed on its own:

1. ``plan`` on an empty store: expand the grid, validate and key every job (ptqscale-plan).
2. Write a record for 98% of the jobs through ``write_record`` (5% of them failed) in a
   process pool: the fields of a real record (docs/records.md; a per-layer list with one
   entry per linear layer, the resolved config); metrics are synthetic. Not a target,
   reported for scale: it is the I/O of 10^5 jobs that each fsync one file.
3. ``consolidate`` (first time: every JSON parsed), ``read_records`` (from the Parquet),
   ``record_states``.
4. The remaining 2% of the jobs finish; ``consolidate`` again (incremental) and
   ``read_records`` (Parquet + the new JSON files).
5. ``plan`` with the store filled: done / failed / pending for every job.

Writes DIR/store.md and DIR/store.json (machine, date, versions, every number).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow

from ptqscale.store import consolidate, read_records, write_record
from ptqscale.store.records import record_states
from ptqscale.store.schema import stored_method

STUDY = "store_bench"
MODELS = ["stories260k", "gutenberg-llama-200k", "gutenberg-llama-500k", "gutenberg-llama-1m"]
METHODS = ["rtn", "gptq"]
FORMATS = ["bf16", "int8", "int4_g128", "int3_g128", "int4_g64", "int2_g64", "int4", "int8_g128",
           "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp4_e2m1", "mxfp8_e4m3", "mxfp8_e5m2",
           "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8", "mxint4_b32", "mxint4_b64",
           "mxint4_b128", "mxint3_b32", "mxint3_b128", "nvfp4", "nf4"]
TARGET_S = 60.0     # "seconds, not minutes": each timed step of the 10^5 run


def sweep(jobs: int, results: Path) -> list[str]:
    seeds = math.ceil(jobs / (len(MODELS) * len(METHODS) * len(FORMATS)))
    return [f"study={STUDY}", f"model={','.join(MODELS)}", f"method={','.join(METHODS)}",
            f"format={','.join(FORMATS)}", f"seed=range(0,{seeds})", f"paths.results={results}"]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def job_specs(overrides: list[str]) -> list:
    """The validated spec of every job, as the planner computes them (valid ones only)."""
    from hydra import initialize_config_dir

    from ptqscale.runner.app import conf_dir
    from ptqscale.runner.config import register_configs
    from ptqscale.runner.plan import expand_sweep
    from ptqscale.runner.planner import INVALID, Planner

    register_configs()
    specs = []
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        planner = Planner()
        for job in expand_sweep(overrides):
            try:
                specs.append(planner.spec(job))
            except INVALID:
                continue
    return specs


def synthetic_record(spec, rng: random.Random, status: str) -> dict:
    """A record with a real record's fields; the numbers are made up (see module doc)."""
    bits = spec.fmt.describe().get("bits_per_weight") or 16.0
    nll_fp = 1.4 + 0.6 * rng.random()
    nll = nll_fp + 3.0 * 2.0 ** (-bits) * (1 + 0.1 * rng.random())
    n_layers = 7 * {"stories260k": 5}.get(spec.model.name, 4)
    layers = [{"name": f"model.layers.{i // 7}.{'qkvogud'[i % 7]}_proj", "numel": 4096 * (1 + i % 3),
               "sqnr_db": 6.02 * bits + rng.gauss(0, 0.5), "shape": [64, 64 * (1 + i % 3)]}
              for i in range(n_layers)]
    record = {
        "job_key": spec.key, "study": spec.study, "name": spec.name, "status": status,
        "protocol_version": 1, "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {"name": spec.model.name, "family": spec.model.family, "size": spec.model.size,
                  "path": spec.model.path, "dtype": spec.model.dtype},
        "data": {"name": spec.data.name, "split": spec.data.split},
        "eval": asdict(spec.eval), "method": stored_method(asdict(spec.method)),
        "format": spec.fmt.describe(),
        "params": {"total": 1_340_448, "embedding": 786_432, "head": 0, "blocks": 553_920,
                   "quantizable": 552_960},
        "metrics": {"nll": nll, "perplexity": math.exp(nll), "nll_fp": nll_fp,
                    "perplexity_fp": math.exp(nll_fp), "dnll": nll - nll_fp, "tokens": 262_144,
                    "nll_sum": nll * 262_144, "weight_sqnr_db": 6.02 * bits,
                    "model_bytes": int(552_960 * bits / 8), "fp_cached": True},
        "timings": {k: rng.random() for k in ("load", "fp_eval", "quantize", "eval", "total")},
        "env": {"torch": "2.13.0", "transformers": "5.23.0", "python": "3.11.7",
                "git_sha": "0" * 40, "device": "cuda:0", "hostname": "node001"},
        "wandb": {"status": "offline"}, "layers": layers,
        "config": {"study": spec.study, "seed": spec.seed, "model": asdict(spec.model),
                   "data": asdict(spec.data), "eval": asdict(spec.eval),
                   "method": stored_method(asdict(spec.method)),
                   "paths": {"results": spec.results}},
    }
    if status == "failed":
        record["error"] = {"type": "RuntimeError", "message": "CUDA out of memory",
                           "traceback": "Traceback (most recent call last): ..." * 20}
    return record


def _write(args: tuple) -> None:
    root, record = args
    write_record(root, record)


def write_records(root: Path, specs: list, workers: int, seed: int = 0) -> float:
    rng = random.Random(seed)
    records = [synthetic_record(s, rng, "failed" if rng.random() < 0.05 else "complete")
               for s in specs]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write, ((str(root), r) for r in records), chunksize=256))
    return time.perf_counter() - t0


def run_plan(overrides: list[str]) -> dict[str, int]:
    from ptqscale.runner.plan import format_plan, plan

    jobs = plan(overrides)
    format_plan(jobs)
    return {s: sum(j.state == s for j in jobs) for s in ("done", "failed", "pending", "invalid")}


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "pandas": pd.__version__, "pyarrow": pyarrow.__version__,
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true", help="2,000 jobs instead of 10^5")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--workers", type=int, default=4, help="processes writing records")
    args = parser.parse_args()
    n = args.jobs or (2_000 if args.smoke else 100_000)
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.out / "results"
    overrides = sweep(n, root)
    rows = []

    def step(name: str, fn, note: str = "", target: bool = True):
        out, seconds = timed(fn)
        rows.append({"step": name, "seconds": round(seconds, 2), "note": note, "target": target})
        print(f"{name}: {seconds:.2f}s {note}", flush=True)
        return out

    counts = step("plan, empty store", lambda: run_plan(overrides))
    jobs = sum(counts.values())
    rows[-1]["note"] = f"{jobs} jobs ({counts['invalid']} invalid)"
    specs = job_specs(overrides)
    rng = random.Random(1)
    rng.shuffle(specs)
    late = specs[: len(specs) // 50]
    step("write records (setup)", lambda: write_records(root, specs[len(late):], args.workers),
         f"{len(specs) - len(late)} records, {args.workers} processes, fsync each", target=False)
    step("consolidate, first", lambda: consolidate(root, STUDY), "every JSON parsed")
    frame = step("read_records", lambda: read_records(root, STUDY, status=None), "from Parquet")
    rows[-1]["note"] += f", {frame.shape[0]} rows x {frame.shape[1]} columns"
    step("record_states", lambda: record_states(root, STUDY), "job_key, status")
    write_records(root, late, args.workers, seed=2)
    step("consolidate, incremental", lambda: consolidate(root, STUDY), f"+{len(late)} new JSON")
    step("read_records, after new jobs", lambda: read_records(root, STUDY, status=None))
    done = step("plan, filled store", lambda: run_plan(overrides))
    rows[-1]["note"] = ", ".join(f"{v} {k}" for k, v in done.items())
    report(args.out, rows, jobs, machine())


def report(out: Path, rows: list[dict], jobs: int, info: dict) -> None:
    worst = max(r["seconds"] for r in rows if r["target"])
    verdict = (f"every timed step under {TARGET_S:.0f} s (slowest {worst:.1f} s)"
               if worst < TARGET_S
               else f"slowest step {worst:.1f} s: over the {TARGET_S:.0f} s target")
    table = pd.DataFrame(rows).drop(columns="target").to_markdown(index=False)
    text = (f"# Store and plan at scale ({jobs} jobs)\n\n"
            f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, pandas "
            f"{info['pandas']}, pyarrow {info['pyarrow']}; {info['date']}.\n"
            f"Command: `python bench/bench_store.py --out DIR`. Result: {verdict}. Load "
            f"average while it ran: {info['load']}.\n\n{table}\n")
    (out / "store.md").write_text(text)
    (out / "store.json").write_text(json.dumps({"jobs": jobs, "machine": info, "steps": rows,
                                                "target_s": TARGET_S}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
