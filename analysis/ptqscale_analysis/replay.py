"""Replay: what the predictor-guided sweeper would have done on a finished study, and how
its answer compares with the full grid's and with a random design of the same budget.

No job runs: :class:`ReplayOracle` reveals the store's records as the design asks for them.
Scores of one design (:func:`score`):

- ``mae_unrun``: MAE (nats) of the design's forest on the grid points it did not run (its
  answer there), against the full grid's ``cv_mae``: the same forest trained on the rest
  of the grid, 5-fold over the grid's runnable points (the accuracy the full grid buys).
- ``frontier``: how many of the full grid's measured frontier points (memory vs NLL, per
  corpus and family, baselines included) the design measured and kept on its frontier,
  ``frontier_extra`` the points on its frontier that are not on the full one, and
  ``frontier_gap``: the largest excess (nats) of the design's best measured NLL under a
  memory budget over the full grid's, over every budget where the full frontier steps.
  ``frontier_noise``: the full frontier's points that the design found or came within
  twice the point's ``dnll_se`` of (its best measured NLL at no more bytes): the points it
  missed by more than the evaluation can resolve are the rest (NaN without ``dnll_se``).
- ``gamma_err`` (question law): the largest relative error of a group's exponent against the
  full grid's fit, and ``gamma_in_ci`` how many groups' exponents lie in the full grid's
  interval.

Example (or ``python -m ptqscale_analysis.replay --study family_scan``)::

    >>> full = load_study("results", "family_scan")                       # doctest: +SKIP
    >>> table = compare(full, ["model", "data", "method", "format"], DesignConfig("pareto"))
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import numpy as np
import pandas as pd

from ptqscale_analysis.active import (
    Answer,
    DesignConfig,
    answer,
    grid_from_frame,
    match,
    run_design,
    runnable,
    screen_table,
)
from ptqscale_analysis.errors import AnalysisError


class ReplayOracle:
    """The records of a finished study revealed as the design asks for them. ``full`` is a
    :func:`load_study` frame, ``grid`` its grid (:func:`grid_from_frame`)."""

    def __init__(self, full: pd.DataFrame, grid: pd.DataFrame):
        self.full, self.rows, self.shown = full, match(grid, full), set()

    def frame(self) -> pd.DataFrame:
        labels = [self.rows[i] for i in sorted(self.shown) if pd.notna(self.rows[i])]
        return self.full.loc[labels]

    def run(self, points: list[int]) -> pd.DataFrame:
        self.shown |= set(points)
        return self.frame()


def replay_screen(full: pd.DataFrame, cfg: DesignConfig) -> pd.Series | None:
    """The screen a sweep with ``cfg.screen`` would have measured first: the first-order
    values of the study's own RTN records (:func:`~ptqscale_analysis.active.screen_table`)."""
    return screen_table(full) if cfg.screen else None


def cv_mae(full: pd.DataFrame, grid: pd.DataFrame, cfg: DesignConfig, folds: int = 5) -> float:
    """The full grid's predictor MAE: each fold of the runnable points predicted by the
    forest trained on the other folds, with the features a sweep would know (the screen
    too, with ``cfg.screen``)."""
    rows = match(grid, full)
    points = np.random.default_rng(cfg.seed).permutation(runnable(grid))
    screen = replay_screen(full, cfg)
    err = []
    for part in np.array_split(points, folds):
        train = full.loc[rows.drop(part).dropna()]
        pred = answer(grid, train, cfg, screen).table.loc[part, "dnll"].to_numpy(float)
        err.append(np.abs(pred - full.loc[rows[part], "dnll"].to_numpy(float)))
    return float(np.mean(np.concatenate(err)))


def score(final: Answer, truth: Answer, se: pd.Series | None = None) -> dict:
    """The scores of one design's final answer against the full grid's (module docstring);
    ``se``: each grid point's ``dnll_se`` (0 for a baseline), for ``frontier_noise``."""
    t, true = final.table, truth.table
    unrun = t.index[~t["measured"]]
    mae = float(np.mean(np.abs(t.loc[unrun, "dnll"] - true.loc[unrun, "dnll"]))) \
        if len(unrun) else 0.0
    found = set(final.frontier) & set(truth.frontier)
    gaps = _gaps(true, final.frontier, truth.frontier)
    gap_se = se.reindex(gaps.index) if se is not None else pd.Series(np.nan, gaps.index)
    out = {"mae_unrun": mae, "frontier": len(found), "frontier_of": len(truth.frontier),
           "frontier_extra": len(set(final.frontier) - set(truth.frontier)),
           "frontier_gap": float(gaps.max()) if len(gaps) else 0.0,
           "frontier_noise": (int((gaps <= 2 * gap_se).sum()) if gap_se.notna().all()
                              else math.nan)}
    if truth.law is not None and final.law is not None:
        full = truth.law.set_index("group")
        mine = final.law.set_index("group").reindex(full.index)
        err = (mine["value"] - full["value"]).abs() / full["value"].abs()
        inside = mine["value"].between(full["ci_low"], full["ci_high"])
        out |= {"gamma_err": float(err.max()),    # NaN-free: a group not fitted counts inf
                "gamma_in_ci": int(inside.sum()), "gamma_of": len(full)}
        if err.isna().any():
            out["gamma_err"] = math.inf
    return out


def _gaps(true: pd.DataFrame, mine: list[int], full: list[int]) -> pd.Series:
    """Per full-frontier point: the design's best measured NLL at no more bytes, less the
    full frontier's there (0: found or matched; inf: the design has nothing that cheap)."""
    groups = [c for c in ("data.name", "model.family") if c in true]
    gaps = {}
    for i in full:
        same = (true[groups] == true.loc[i, groups]).all(axis=1)
        cheap = same & (true["model_bytes"] <= true.at[i, "model_bytes"])
        have = true.loc[true.index.isin(mine) & cheap, "nll"]
        best = true.loc[true.index.isin(full) & cheap, "nll"].min()
        gaps[i] = max((have.min() if len(have) else math.inf) - best, 0.0)
    return pd.Series(gaps, dtype=float)


def point_se(full: pd.DataFrame, grid: pd.DataFrame) -> pd.Series:
    """Each grid point's ``metrics.dnll_se`` (0 for a baseline: its dNLL is 0 by
    definition; NaN where not recorded)."""
    rows = match(grid, full)
    col = full.get("metrics.dnll_se", pd.Series(np.nan, index=full.index))
    se = pd.Series(np.nan, index=grid.index)
    have = rows.notna()
    se[have] = pd.to_numeric(col.loc[rows[have]], errors="coerce").to_numpy(float)
    se[grid["baseline"].astype(bool)] = 0.0
    return se


def compare(full: pd.DataFrame, keys: list[str], cfg: DesignConfig,
            random_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> pd.DataFrame:
    """One row per design: the guided sweeper, then random designs with its job count."""
    grid = grid_from_frame(full, keys)
    screen = replay_screen(full, cfg)
    truth = answer(grid, full, cfg, screen)
    ref = cv_mae(full, grid, cfg)
    se = point_se(full, grid)
    out = []
    guided = run_design(grid, ReplayOracle(full, grid), cfg, screen=screen)
    out.append({"design": "guided", "seed": cfg.seed, "jobs": guided.jobs,
                "stopped": guided.stopped} | score(guided.final, truth, se))
    for seed in random_seeds:
        rcfg = dataclasses.replace(cfg, strategy="random", seed=seed, budget=guided.jobs)
        h = run_design(grid, ReplayOracle(full, grid), rcfg, screen=screen)
        out.append({"design": "random", "seed": seed, "jobs": h.jobs, "stopped": h.stopped}
                   | score(h.final, truth, se))
    table = pd.DataFrame(out)
    table.insert(3, "of_grid", table["jobs"] / len(grid))
    table["cv_mae_full"] = ref
    table["mae_ratio"] = table["mae_unrun"] / ref
    return table


def main(argv: list[str] | None = None) -> None:
    from ptqscale_analysis.load import load_study

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--study", required=True)
    ap.add_argument("--keys", default="model,data,method,format",
                    help="the swept keys of the study's grid (comma-separated)")
    ap.add_argument("--question", default="predictor", choices=["predictor", "pareto", "law"])
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--screen", action="store_true",
                    help="screen every point first (RTN first_order; needs those records)")
    args = ap.parse_args(argv)
    try:
        cfg = DesignConfig(args.question, args.budget, args.batch_size, args.seed,
                           screen=args.screen)
        table = compare(load_study(args.results, args.study), args.keys.split(","), cfg)
    except AnalysisError as e:   # a bad setting or records that cannot answer: say which
        sys.exit(f"error: {' '.join(str(e).split())}")
    print(table.to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
