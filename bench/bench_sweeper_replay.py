"""The predictor-guided sweeper replayed on a committed study against random designs of the
same budget (issue 24). CPU only: no job runs, the store's records are revealed on demand.

Usage::

    PYTHONPATH=$PWD/src:$PWD/analysis python bench/bench_sweeper_replay.py --out bench/results

For each question (predictor, pareto, law) and each guided seed: the guided design with a budget
of 30% of the grid, then random designs (a seed design of the same kind, then uniform picks)
with the guided design's job count. Then the pareto question with larger budgets, to show
how many jobs its exact frontier needs. Writes ``bench_sweeper_replay.md`` and ``.json`` into --out.
Scores: ptqscale_analysis.replay (module docstring); ``mae_ratio`` = MAE on the points the
design did not run / the full grid's 5-fold MAE; ``frontier_gap`` (nats) = the largest excess
of the design's best measured NLL under a memory budget over the full grid's;
``frontier_noise`` = the full frontier's points found or missed by at most twice their
``dnll_se`` (what the evaluation cannot resolve; studies measured from 2026-12-05); ``gamma_err``
= the largest relative error of a group's noise-law exponent against the full grid's fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import sklearn

from ptqscale_analysis.active import DesignConfig, answer, grid_from_frame, run_design
from ptqscale_analysis.load import load_study
from ptqscale_analysis.replay import ReplayOracle, compare, point_se, score

KEYS = ["model", "data", "method", "format"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", default="results")
    ap.add_argument("--study", default="family_scan")
    ap.add_argument("--guided-seeds", default="0,1,2")
    ap.add_argument("--random-seeds", type=int, default=3, help="random designs per guided one")
    ap.add_argument("--questions", default="predictor,pareto,law")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    full = load_study(args.results, args.study)
    tables, t0 = [], time.time()
    for question in args.questions.split(","):
        for g in map(int, args.guided_seeds.split(",")):
            cfg = DesignConfig(question, budget=0.3, batch_size=8, seed=g)
            rs = tuple(range(10 * g, 10 * g + args.random_seeds))
            tables.append(compare(full, KEYS, cfg, rs).assign(question=question, guided_seed=g))
            print(tables[-1].to_string(), flush=True)
    grid = grid_from_frame(full, KEYS)
    truth, se = answer(grid, full, DesignConfig("pareto")), point_se(full, grid)
    curve = []
    for budget in (0.3, 0.5, 0.7, len(grid)):   # a count >= 1: the whole grid
        cfg = DesignConfig("pareto", budget=budget, batch_size=8)
        h = run_design(grid, ReplayOracle(full, grid), cfg)
        curve.append({"budget": min(budget, 1.0), "jobs": h.jobs, "of_grid": h.jobs / len(grid),
                      "stopped": h.stopped} | score(h.final, truth, se))
        print(curve[-1], flush=True)
    write(Path(args.out), args, pd.concat(tables, ignore_index=True), pd.DataFrame(curve),
          len(grid), time.time() - t0)


def write(out: Path, args, table: pd.DataFrame, curve: pd.DataFrame, n: int, secs: float):
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "device": "CPU (replay: no job runs)",
            "python": platform.python_version(), "sklearn": sklearn.__version__,
            "study": args.study, "grid": n, "seconds": round(secs, 1),
            "design": dataclasses.asdict(DesignConfig())}
    cols = ["question", "design", "guided_seed", "seed", "jobs", "of_grid", "stopped",
            "mae_unrun", "cv_mae_full", "mae_ratio", "frontier", "frontier_of",
            "frontier_extra", "frontier_gap", "frontier_noise", "gamma_err", "gamma_in_ci"]
    cols = [c for c in cols if c in table]   # gamma_*: only when the law question ran
    summary = (table.groupby(["question", "design"])
               [[c for c in ("jobs", "mae_ratio", "frontier", "frontier_extra", "frontier_gap",
                             "frontier_noise", "gamma_err", "gamma_in_ci") if c in table]]
               .agg(["mean", "min", "max"]))
    summary.columns = [f"{a} {b}" for a, b in summary.columns]
    summary = summary.reset_index()
    # family_scan's table keeps its name; another study's is bench_sweeper_replay_<study>
    stem = "bench_sweeper_replay" + ("" if args.study == "family_scan" else f"_{args.study}")
    (out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "runs": table[cols].to_dict("records"),
         "pareto_budgets": curve.to_dict("records")}, indent=1, default=str))
    md = [f"# Predictor-guided sweeper, replayed on {args.study} ({meta['date']}, CPU)", "",
          f"No job runs: the {n} committed records are revealed as each design asks for them "
          f"(`python bench/{Path(__file__).name} {_args_text(args)}`, {secs:.0f} s "
          "on 2 CPU cores). Guided: `DesignConfig` defaults (budget 30% of the grid, batches of "
          f"8), seeds {args.guided_seeds}; random: a seed design of the same kind (its own "
          "shuffle), then uniform picks, with the guided design's job count, "
          f"{args.random_seeds} seeds per guided design.", "",
          "## Mean, min and max over designs", "", summary.to_markdown(index=False, floatfmt=".4g"),
          "",
          "## Every design", "", table[cols].to_markdown(index=False, floatfmt=".4g"), "",
          "## Pareto: jobs the measured frontier needs (guided, seed 0)", "",
          curve.to_markdown(index=False, floatfmt=".4g"), ""]
    (out / f"{stem}.md").write_text("\n".join(md))


def _args_text(args) -> str:
    """The command line's options as given (the output folder as DIR)."""
    given = {k: v for k, v in vars(args).items() if k != "out"}
    return "--out DIR " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items())


if __name__ == "__main__":
    sys.exit(main())
