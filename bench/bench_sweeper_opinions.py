"""The pareto design with and without the rank-1 opinion (issue 24), replayed on a committed
study: the trees alone (``pareto_rank1=False``) against trees +
:func:`ptqscale_analysis.active_pareto.rank1_dnll` (the default), five seeds at each budget.
CPU only: no job runs.

Usage::

    PYTHONPATH=$PWD/src:$PWD/analysis python bench/bench_sweeper_opinions.py --out bench/results

Writes ``bench_sweeper_opinions.md`` and ``.json``: per design the frontier points found (of
the full grid's), the points on its frontier that are not on the full one, and the frontier
gap (nats; the scores of :mod:`ptqscale_analysis.replay`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
import warnings
from pathlib import Path

import pandas as pd

from ptqscale_analysis.active import DesignConfig, answer, grid_from_frame, run_design
from ptqscale_analysis.load import load_study
from ptqscale_analysis.replay import ReplayOracle, score

KEYS = ["model", "data", "method", "format"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", default="results")
    ap.add_argument("--study", default="family_scan")
    ap.add_argument("--budgets", default="0.3,0.5,0.7")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    full = load_study(args.results, args.study)
    grid = grid_from_frame(full, KEYS)
    truth = answer(grid, full, DesignConfig("pareto"))
    rows, t0 = [], time.time()
    for rank1 in (False, True):
        for budget in map(float, args.budgets.split(",")):
            for seed in range(args.seeds):
                cfg = DesignConfig("pareto", budget=budget, seed=seed, pareto_rank1=rank1)
                h = run_design(grid, ReplayOracle(full, grid), cfg)
                rows.append({"opinion": "trees + rank-1" if rank1 else "trees", "budget": budget,
                             "seed": seed, "jobs": h.jobs} | score(h.final, truth))
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    summary = (table.groupby(["budget", "opinion"])[["frontier", "frontier_extra", "frontier_gap"]]
               .agg(["mean", "min", "max"]))
    summary.columns = [" ".join(c) for c in summary.columns]
    summary = summary.reset_index()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "device": "CPU (replay: no job runs)",
            "python": platform.python_version(), "study": args.study, "grid": len(grid),
            "frontier_of": len(truth.frontier), "seconds": round(time.time() - t0, 1)}
    (out / "bench_sweeper_opinions.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1, default=float) + "\n")
    (out / "bench_sweeper_opinions.md").write_text(
        f"# Pareto design: the trees alone vs trees + rank-1 ({meta['date']}, CPU)\n\n"
        f"Replayed on {args.study} ({len(grid)} grid points, {len(truth.frontier)} on the measured "
        f"frontier), `DesignConfig('pareto', budget, seed)` defaults otherwise, seeds "
        f"0-{args.seeds - 1}; `python bench/bench_sweeper_opinions.py --out DIR`, "
        f"{meta['seconds']:.0f} s on 2 CPU cores.\n\n"
        + summary.to_markdown(index=False, floatfmt=".4g") + "\n\n## Every design\n\n"
        + table.to_markdown(index=False, floatfmt=".4g") + "\n")


if __name__ == "__main__":
    main()
