"""The cost of a whole study against the same jobs run one by one from cold (issue 23).

    python bench/bench_study_cost.py --out DIR                  # a 1B model (needs the hub)
    python bench/bench_study_cost.py --out DIR --model gutenberg-llama-1m --max-tokens 65536

A grid of formats x methods (default: family_scan's 13 formats x {rtn, gptq}) on one model
and corpus is run twice, each into a fresh results folder, timed end to end from process
launch to exit:

- cold: every job alone, ``ptqscale-run <one point>`` in its own process with its own
  empty results and cache folders (model load, token streams, the full-precision
  evaluation and the GPTQ Hessians all paid by every job);
- study: one ``ptqscale-run --multirun`` of the whole grid into one results folder, as a
  user launches a study (one worker: model loaded once and given back between jobs, token
  streams, the full-precision reference and, with ``fp_inputs``, Hessians shared).

Both must produce the same numbers: the script checks every job's NLL is bitwise equal
between the two before it reports the ratio study / sum(cold). Writes DIR/study_cost.md and
DIR/study_cost.json (device, date, versions, every job's seconds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ptqscale.store import iter_records

STUDY = "study_cost_bench"
FORMATS = ("bf16,int8,int4_g128,int3_g128,fp8_e4m3,mxfp8_e4m3,mxfp6_e2m3,mxfp4,mxint8,"
           "mxint4_b32,mxint3_b128,nvfp4,nf4")


def common(args: argparse.Namespace, results: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "ptqscale.runner.app", *flags, f"study={STUDY}", f"model={args.model}",
            f"data={args.data}", f"eval.max_tokens={args.max_tokens}", "wandb.mode=disabled",
            "progress=false", f"paths.results={results}", *args.override]


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}; see {log}")
    return seconds


def nll_by_point(results: Path) -> dict[tuple[str, str], float]:
    return {(r["method"]["name"], r["format"]["name"]): r["metrics"]["nll"]
            for r in iter_records(results, STUDY) if r.get("status") == "complete"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--data", default="gutenberg")
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--max-tokens", type=int, default=262144)
    ap.add_argument("--work", type=Path, default=Path("/tmp/study_cost"))
    ap.add_argument("override", nargs="*", help="more Hydra overrides for every job")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "logs").mkdir(parents=True)
    points = [(m, f) for m in args.methods.split(",") for f in args.formats.split(",")]

    study = args.work / "study"
    study_s = timed([*common(args, study, "--multirun"), f"method={args.methods}",
                     f"format={args.formats}"], args.work / "logs" / "study.log")
    cold, cold_nll = [], {}
    for i, (method, fmt) in enumerate(points):
        results = args.work / "cold" / str(i)
        s = timed([*common(args, results), f"method={method}", f"format={fmt}"],
                  args.work / "logs" / f"cold-{i}.log")
        cold.append({"method": method, "format": fmt, "s": round(s, 2)})
        cold_nll |= nll_by_point(results)
        shutil.rmtree(results)  # a cold job's caches are its own; free the disk as we go
    study_nll = nll_by_point(study)
    if set(study_nll) != set(points) or set(cold_nll) != set(points):
        sys.exit(f"missing jobs: study {sorted(set(points) - set(study_nll))}, "
                 f"cold {sorted(set(points) - set(cold_nll))}")
    differ = [p for p in points if study_nll[p] != cold_nll[p]]
    cold_s = sum(c["s"] for c in cold)
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available()
            else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(),
            "model": args.model, "data": args.data, "max_tokens": args.max_tokens,
            "override": args.override, "jobs": len(points)}
    result = {"meta": meta, "study_s": round(study_s, 2), "cold_sum_s": round(cold_s, 2),
              "ratio": round(study_s / cold_s, 3), "nll_differ": differ, "cold": cold}
    (args.out / "study_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# A study against its jobs run one by one from cold ({meta['device']})", "",
             f"{meta['date']}; torch {meta['torch']}; model `{args.model}`, data `{args.data}`, "
             f"{args.max_tokens} evaluation tokens, {len(points)} jobs "
             f"({args.methods} x {len(args.formats.split(','))} formats); overrides: "
             f"{' '.join(args.override) or 'none'}.", "",
             "| run | wall s |", "|---|---:|",
             f"| study (one multirun) | {study_s:.1f} |",
             f"| cold: sum of {len(points)} single-job processes | {cold_s:.1f} |",
             f"| **ratio** | **{study_s / cold_s:.3f}** |", "",
             f"NLL equal between the two for {len(points) - len(differ)} of {len(points)} jobs"
             + (f"; differ: {differ}" if differ else "."), "",
             "| method | format | cold job s |", "|---|---|---:|",
             *(f"| {c['method']} | {c['format']} | {c['s']:.1f} |" for c in cold)]
    (args.out / "study_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:10]))
    if differ:
        sys.exit(f"NLL differs between study and cold jobs: {differ}")


if __name__ == "__main__":
    main()
