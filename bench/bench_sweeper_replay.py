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
from ptqscale_analysis.replay import ReplayOracle, compare, point_se, replay_screen, score

KEYS = ["model", "data", "method", "format"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", default="results")
    ap.add_argument("--study", default="family_scan")
    ap.add_argument("--guided-seeds", default="0,1,2")
    ap.add_argument("--random-seeds", type=int, default=3, help="random designs per guided one")
    ap.add_argument("--questions", default="predictor,pareto,law")
    ap.add_argument("--screen", action="store_true",
                    help="screened designs (every point's RTN first_order known first)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    full = load_study(args.results, args.study)
    tables, t0 = [], time.time()
    for question in args.questions.split(","):
        for g in map(int, args.guided_seeds.split(",")):
            cfg = DesignConfig(question, budget=0.3, batch_size=8, seed=g, screen=args.screen)
            rs = tuple(range(10 * g, 10 * g + args.random_seeds))
            tables.append(compare(full, KEYS, cfg, rs).assign(question=question, guided_seed=g))
            print(tables[-1].to_string(), flush=True)
    grid = grid_from_frame(full, KEYS)
    screen = replay_screen(full, DesignConfig(screen=args.screen))
    truth, se = answer(grid, full, DesignConfig("pareto")), point_se(full, grid)
    curve = []
    steps = (0.3, 0.35, 0.4, 0.45, 0.5) if args.screen else (0.3, 0.5)  # where it closes
    for budget in (*steps, 0.7, len(grid)):   # a count >= 1: the whole grid
        cfg = DesignConfig("pareto", budget=budget, batch_size=8, screen=args.screen)
        h = run_design(grid, ReplayOracle(full, grid), cfg, screen=screen)
        curve.append({"budget": min(budget, 1.0), "jobs": h.jobs, "of_grid": h.jobs / len(grid),
                      "stopped": h.stopped} | score(h.final, truth, se))
        print(curve[-1], flush=True)
    write(Path(args.out), args, pd.concat(tables, ignore_index=True), pd.DataFrame(curve),
          len(grid), time.time() - t0, screen_cost(full, grid) if args.screen else None)


def write(out: Path, args, table: pd.DataFrame, curve: pd.DataFrame, n: int, secs: float,
          cost: dict | None = None):
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "device": "CPU (replay: no job runs)",
            "python": platform.python_version(), "sklearn": sklearn.__version__,
            "study": args.study, "grid": n, "seconds": round(secs, 1),
            "design": dataclasses.asdict(DesignConfig(screen=args.screen))}
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
    stem = "bench_sweeper_replay" + ("" if args.study == "family_scan" else f"_{args.study}") \
        + ("_screen" if args.screen else "")
    (out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "runs": table[cols].to_dict("records"), "screen_cost": cost,
         "pareto_budgets": curve.to_dict("records")}, indent=1, default=str))
    screened = (" Screened: before the seed, every point's RTN `first_order_dnll` is known (the "
                "sweeper's screening stage; here the study's own RTN records, the same values), "
                "and the forest learns dNLL minus it.") if args.screen else ""
    md = [f"# Predictor-guided sweeper, replayed on {args.study} ({meta['date']}, CPU)"
          + (", screened" if args.screen else ""), "",
          f"No job runs: the {n} committed records are revealed as each design asks for them "
          f"(`python bench/{Path(__file__).name} {_args_text(args)}`, {secs:.0f} s "
          "on 2 CPU cores). Guided: `DesignConfig` defaults (budget 30% of the grid, batches of "
          f"8), seeds {args.guided_seeds}; random: a seed design of the same kind (its own "
          "shuffle), then uniform picks, with the guided design's job count, "
          f"{args.random_seeds} seeds per guided design.{screened}", "",
          "## Mean, min and max over designs", "", summary.to_markdown(index=False, floatfmt=".4g"),
          "",
          "## Every design", "", table[cols].to_markdown(index=False, floatfmt=".4g"), "",
          "## Pareto: jobs the measured frontier needs (guided, seed 0)", "",
          curve.to_markdown(index=False, floatfmt=".4g"), ""]
    if cost:
        md += ["## What the screen costs", "",
               f"{cost['screen_jobs']} RTN screening jobs (one per model x corpus x format) "
               f"evaluate {cost['screen_tokens']:,} tokens each, and each of the "
               f"{cost['units']} models x corpora adds one full-precision pass and one gradient "
               f"(3 passes) over them: {cost['share_of_grid']:.1%} of the full grid's "
               f"evaluation ({cost['tokens_per_job']:,.0f} tokens a job), on top of the "
               "design's jobs. GPTQ's calibration, which the screen does not need, is left out "
               "of both, so on a study with GPTQ the share is smaller; on one whose evaluation "
               "is longer than this study's, it shrinks in proportion.", ""]
    (out / f"{stem}.md").write_text("\n".join(md))


def screen_cost(full: pd.DataFrame, grid: pd.DataFrame) -> dict:
    """What the screening stage would cost on this study, in evaluation token-passes against
    the full grid's: one RTN job per (model, corpus, format) evaluating ``first_order``'s
    budget, and per (model, corpus) one full-precision pass and one gradient (forward and
    backward, counted as 3 passes) over it; the grid: every runnable job's evaluation and one
    full-precision evaluation per (model, corpus). GPTQ's calibration is left out of both."""
    from ptqscale.metrics.first_order import MAX_TOKENS
    from ptqscale_analysis.active import runnable

    run = grid.loc[runnable(grid)]
    units = len(run.drop_duplicates(["model", "data"]))
    screens = len(run.drop_duplicates(["model", "data", "format"]))
    job = float(pd.to_numeric(full["metrics.tokens"]).median())
    budget = min(MAX_TOKENS, int(full["eval.max_tokens"].max()))
    screen = budget * (screens + 4 * units)
    return {"screen_jobs": screens, "units": units, "tokens_per_job": job,
            "screen_tokens": budget, "share_of_grid": screen / (job * (len(run) + units))}


def _args_text(args) -> str:
    """The command line's options as given (the output folder as DIR)."""
    given = {k: v for k, v in vars(args).items() if k != "out" and v is not False}
    return "--out DIR " + " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                                   for k, v in given.items())


if __name__ == "__main__":
    sys.exit(main())
