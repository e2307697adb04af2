"""Predictor-guided design of a study's grid: which jobs to run next, and when to stop.

A study's grid is a table of points (one row per job, a column per swept key, e.g. model,
data, method, format). A *question* says what the jobs are for:

- ``predictor``: dNLL over the whole grid (the forest of :mod:`ptqscale_analysis.predictor`);
  the next batch is where the trees disagree most (widest interval), and the sweep stops
  when the grid's answer (measured dNLL where run, predicted elsewhere) stops moving.
- ``pareto``: the measured frontier of memory (``model_bytes``) against NLL, per corpus and
  family (the splits of :mod:`ptqscale_analysis.queries`); the next batch is the points
  with the largest expected improvement over the frontier measured so far (the forest's
  mean and spread, widened by its out-of-bag error), and the sweep stops when no point not
  yet run is expected to improve it by more than ``min_gain``.

With ``screen``, every point comes with a screening value before any job runs:
``screen_dnll``, the first-order damage ``g . e`` of RTN into the point's format (the metric
``first_order`` of a cheap RTN job; :func:`screen_table`). The forest then learns what the
screen misses, ``dNLL - screen_dnll``, and predicts ``screen_dnll`` plus that. Where a model is
not at a minimum of the text's loss (the zoo on WikiText-2), ``g . e`` is about half the
damage and signed: the points that beat their own bf16, many of them on the frontier, are
visible before they run.

Every design starts with a seed that covers each combination of the ``unit_keys`` (model
and corpus: the predictor's model features are measured per model and corpus) once, with
the other keys cycled so that every format and method is seen. Baseline points (16-bit
formats, method none) are never run: every job of a model measures its full-precision
NLL, which is their answer. This module only decides; :func:`run_design` drives any
``Oracle``: the Hydra sweeper (real jobs, hydra_plugins/ptqscale_sweeper) or
:class:`ptqscale_analysis.replay.ReplayOracle` (an existing store's records revealed on
demand: what the sweeper would have done, no job run).

Example::

    >>> full = load_study("results", "family_scan")                       # doctest: +SKIP
    >>> grid = grid_from_frame(full, ["model", "data", "method", "format"])
    >>> history = run_design(grid, ReplayOracle(full, grid), DesignConfig("pareto"))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from ptqscale_analysis.active_law import law_moved, law_score, law_table
from ptqscale_analysis.active_pareto import measured_frontier, nan_reduce, oob_error, pareto_score
from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.predictor import (
    PredictorConfig,
    add_features,
    format_table,
    train_predictor,
)

QUESTIONS = ("predictor", "pareto", "law")
# record columns that describe a model on one corpus (the predictor's model features)
_UNIT_COLUMNS = ("params.total", "params.quantized", "params.blocks", "metrics.nll_fp",
                 "model.family")


@dataclass(frozen=True)
class DesignConfig:
    """How the sweeper chooses (every field is recorded in its log).

    ``budget``: the most jobs, an integer count (>= 1) or a fraction of the grid's points
    (< 1; baseline points count in the grid but are never run). ``tol``/``patience``: the
    answer has stopped moving when its change between two fits is below ``tol``,
    ``patience`` fits in a row (predictor: the mean change of the grid's dNLL over its mean
    magnitude; law: the largest relative change of an exponent). ``pareto_tol`` (nats): a
    pareto point is still a candidate while its expected improvement over the best measured
    NLL at no more bytes, less this tolerance (the resolution wanted), exceeds ``min_gain``
    nats. ``pareto_rank1``: average the forest's dNLL with the grid's own rank-1 law
    (:func:`~ptqscale_analysis.active_pareto.rank1_dnll`); by default on without a screen
    and off with one (replayed on zoo_cross_x4, the screened design finds 117-118 of the 129
    frontier points at 30% without it, 110-112 with it: the screen carries the per-model
    information the law was added for). ``law_*``: see
    :mod:`ptqscale_analysis.active_law`. ``screen``: the design is given each point's
    screening value and the forest learns the rest (module docstring).
    """

    question: str = "predictor"
    budget: float = 0.3
    batch_size: int = 8
    seed: int = 0
    tol: float = 0.05
    patience: int = 2
    pareto_tol: float = 0.0
    min_gain: float = 1e-4
    pareto_rank1: bool | None = None   # None: on without a screen, off with one
    law_tol: float = 0.1         # law: stop when every exponent is known to +- this (relative)
    law_boot: int = 50
    law_min_dnll: float = 0.002
    unit_keys: tuple[str, ...] = ("model", "data")
    n_estimators: int = 100
    strategy: str = "guided"    # or "random": the seed design, then uniform picks (a baseline)
    screen: bool = False        # learn dNLL - screen_dnll, given a screen (module docstring)

    def __post_init__(self):
        if self.pareto_rank1 is None:   # resolved here, so that the design log says which
            object.__setattr__(self, "pareto_rank1", not self.screen)
        if self.question not in QUESTIONS:
            raise AnalysisError(f"question must be one of {list(QUESTIONS)}, "
                                f"got {self.question!r}")
        if self.strategy not in ("guided", "random"):
            raise AnalysisError(f"strategy must be 'guided' or 'random', got {self.strategy!r}")
        if not (self.budget >= 1 and float(self.budget).is_integer()) and not 0 < self.budget < 1:
            raise AnalysisError(f"budget must be a job count >= 1 or a fraction in (0, 1), "
                                f"got {self.budget}")
        if self.batch_size < 1 or self.patience < 1 or self.tol < 0:
            raise AnalysisError("batch_size and patience must be >= 1 and tol >= 0, got "
                                f"{self.batch_size}, {self.patience}, {self.tol}")

    def budget_jobs(self, points: int) -> int:
        """The budget as a job count for a grid of ``points`` (its full job count)."""
        return int(self.budget) if self.budget >= 1 else math.floor(self.budget * points)


# ---- the grid and what the store knows of it ---------------------------------------------

def record_column(key: str, frame_columns) -> str:
    """The record column of a swept key: ``model`` -> ``model.name`` (a config group),
    ``eval.seqlen`` -> ``eval.seqlen`` (a value)."""
    return f"{key}.name" if f"{key}.name" in frame_columns or "." not in key else key


def grid_from_frame(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The grid of a finished study: every combination of the values its records hold."""
    cols = [record_column(k, frame.columns) for k in keys]
    values = [sorted(frame[c].astype(str).unique()) for c in cols]
    grid = pd.MultiIndex.from_product(values, names=keys).to_frame(index=False)
    base = frame[frame["is_baseline"]]
    grid["baseline"] = grid["format"].isin(base["format.name"]) if "format" in keys else False
    if "method" in keys:
        grid["baseline"] |= grid["method"] == "none"
    return grid


def match(grid: pd.DataFrame, frame: pd.DataFrame) -> pd.Series:
    """Per grid point, the label of its record in ``frame`` (NaN: not measured)."""
    keys = [k for k in grid.columns if k != "baseline"]
    cols = [record_column(k, frame.columns) for k in keys]
    if frame.empty:
        return pd.Series(np.nan, index=grid.index)
    missing = [k for k, c in zip(keys, cols) if c not in frame]
    if missing:
        raise AnalysisError(f"swept keys {missing} are not in the study's records (looked for "
                            f"{[record_column(k, []) for k in missing]}): a grid point is "
                            "matched to its record by the record's value of each swept key")
    rec = frame[cols].map(_text).set_axis(keys, axis=1).assign(_row=frame.index)
    rec = rec.drop_duplicates(keys, keep="last")
    merged = grid[keys].map(_text).merge(rec, on=keys, how="left")
    return pd.Series(merged["_row"].to_numpy(), index=grid.index)


def _text(value) -> str:
    """A swept value as text that a record's value matches: 1e-4 and 0.0001 alike."""
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def runnable(grid: pd.DataFrame) -> pd.Index:
    return grid.index[~grid["baseline"].astype(bool)]


def seed_design(grid: pd.DataFrame, cfg: DesignConfig) -> list[int]:
    """One runnable point per combination of ``cfg.unit_keys``, the other keys cycled
    through a shuffled order so every value of every key appears (when there are enough
    units); more points when a key has more values than there are units."""
    rng = np.random.default_rng(cfg.seed)
    run = grid.loc[runnable(grid)]
    units = [k for k in cfg.unit_keys if k in grid.columns]
    others = [k for k in grid.columns if k not in (*units, "baseline")]
    groups = list(run.groupby(units, sort=True).groups.values()) if units else [run.index]
    n = max([len(groups)] + [run[k].nunique() for k in others])
    cycles = {k: rng.permutation(sorted(run[k].unique())) for k in others}
    chosen: list[int] = []
    for i in range(n):
        pool = run.loc[groups[i % len(groups)]]
        want = {k: cycles[k][i % len(cycles[k])] for k in others}
        hits = (pool[others] == pd.Series(want)).sum(axis=1) if others else pd.Series(0, pool.index)
        hits = hits[~hits.index.isin(chosen)]
        if len(hits):
            best = hits[hits == hits.max()].index
            chosen.append(int(rng.choice(best)))
    return chosen


# ---- features and predictions of points not yet run --------------------------------------

def grid_table(grid: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """The grid with the record columns each point's answer needs, from ``frame``: the unit's
    model columns (per model and corpus), the format's features (means over its records)
    and the RTN weight SQNR of the (model, format) pair where measured."""
    keys = [k for k in grid.columns if k != "baseline"]
    cols = [record_column(k, frame.columns) for k in keys]
    t = grid.rename(columns=dict(zip(keys, cols)))
    for col in ("model.name", "data.name", "method.name", "format.name"):
        if col not in t and col in frame:   # not swept: the study's one value
            t[col] = frame[col].astype(str).mode().iloc[0]
    unit = [c for c in ("model.name", "data.name") if c in t]
    model = [c for c in frame.columns if c in _UNIT_COLUMNS or c.startswith("landscape.")]
    per_unit = frame.assign(**{c: frame[c].astype(str) for c in unit}).drop_duplicates(unit)
    t = t.merge(per_unit[unit + model], on=unit, how="left")
    q = frame[~frame["is_baseline"]]
    if len(q):
        t = t.join(format_table(q), on="format.name")
        rtn = q[q["method.name"] == "rtn"].groupby(["model.name", "format.name"])
        pair = rtn["metrics.weight_sqnr_db"].mean() if "metrics.weight_sqnr_db" in q else None
        if pair is not None and len(pair):
            idx = pd.MultiIndex.from_frame(t[["model.name", "format.name"]])
            t["rtn_sqnr_db"] = pd.Series(pair.reindex(idx).to_numpy(), t.index).fillna(
                t["rtn_sqnr_db"])
    t["baseline"] = grid["baseline"].astype(bool).to_numpy()
    for col in ("bits_per_weight", "params.quantized", "params.total", "metrics.nll_fp"):
        t[col] = pd.to_numeric(t[col], errors="coerce") if col in t else np.nan
    bits = t["bits_per_weight"].where(~t["baseline"], 16.0)   # the 16-bit baselines
    quantized = t["params.quantized"]
    t["model_bytes"] = quantized * bits / 8 + (t["params.total"] - quantized) * 2
    return t


# ---- the screen: a value for every point before it runs ------------------------------------

SCREEN_KEYS = ("model.name", "data.name", "format.name")


def screen_table(frame: pd.DataFrame) -> pd.Series:
    """``screen_dnll`` per (model, data, format): the metric ``first_order`` of the RTN
    records in ``frame``. The sweeper's screening stage runs RTN jobs whose evaluation is cut
    to the metric's gradient budget (``first_order.MAX_TOKENS``), so cheap; a study's own full
    RTN jobs give the same values (the gradient reads the same first tokens), which is what a
    replay uses."""
    need = ["method.name", "metrics.first_order_dnll", *SCREEN_KEYS]
    missing = [c for c in need if c not in frame]
    if missing:
        raise AnalysisError(f"a screen needs RTN records with the metric first_order; the "
                            f"records lack {missing} (run the jobs with "
                            "metrics=[nll,first_order,...])")
    rtn = frame[(frame["method.name"] == "rtn") & ~frame["is_baseline"].astype(bool)]
    keys = rtn[list(SCREEN_KEYS)].astype(str)
    values = pd.to_numeric(rtn["metrics.first_order_dnll"], errors="coerce")
    return values.groupby([keys[c] for c in SCREEN_KEYS]).mean().dropna()


def screen_of(rows: pd.DataFrame, screen: pd.Series) -> np.ndarray:
    """Each row's screening value (NaN where the screen has none)."""
    idx = pd.MultiIndex.from_frame(rows[list(SCREEN_KEYS)].astype(str))
    return screen.reindex(idx).to_numpy(float)


def tree_predictions(frame: pd.DataFrame, table: pd.DataFrame, cfg: DesignConfig,
                     screen: pd.Series | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """dNLL of every tree (rows) at every grid point (columns), NaN columns where the
    point's features are unknown (a model, format or method no record has shown yet); and
    the forest's out-of-bag error model (:func:`~ptqscale_analysis.active_pareto.oob_error`; NaN before there is one).
    With a ``screen`` the forest learns ``dNLL - screen_dnll`` (records without a screening
    value are left out) and each tree's prediction is that plus the point's screen."""
    if screen is not None:
        frame = frame.assign(dnll=frame["dnll"] - screen_of(frame, screen))
    out = np.full((cfg.n_estimators, len(table)), np.nan)
    try:
        pred = train_predictor(frame, PredictorConfig(n_estimators=cfg.n_estimators,
                                                      seed=cfg.seed))
    except AnalysisError:   # nothing quantized measured yet
        return out, (math.nan, math.nan)
    oob = oob_error(pred, frame)
    X = add_features(table, pred.methods)
    known = table["method.name"].isin(pred.methods).to_numpy().copy()
    for f in pred.features:
        known &= pd.to_numeric(X[f], errors="coerce").notna().to_numpy() if f in X else False
    if known.any():
        values = X.loc[known, pred.features].to_numpy(float)
        out[:, known] = np.stack([t.predict(values) for t in pred.forest.estimators_])
    if screen is not None:
        out += screen_of(table, screen)[None, :]
    return out, oob


# ---- answers ------------------------------------------------------------------------------

@dataclass
class Answer:
    """The question's answer now: per grid point the dNLL (measured or predicted, 0 for a
    baseline), NLL and bytes, plus the pareto frontier (point ids) and each point's score
    (how much running it could change the answer)."""

    table: pd.DataFrame
    frontier: list[int]
    score: pd.Series
    law: pd.DataFrame | None = None   # question law: gamma and its interval per group


def answer(grid: pd.DataFrame, frame: pd.DataFrame, cfg: DesignConfig,
           screen: pd.Series | None = None) -> Answer:
    """Fit on ``frame`` (the records so far) and answer ``cfg.question`` over ``grid``
    (``screen``: :func:`screen_table`, required with ``cfg.screen``)."""
    if cfg.screen and screen is None:
        raise AnalysisError("screen=true: the design needs a screen (screen_table of the "
                            "screening records)")
    if frame.empty:   # nothing measured yet: nothing known, every point a candidate
        t = grid.assign(dnll=float("nan"), nll=float("nan"), measured=grid["baseline"])
        return Answer(t, [], pd.Series(np.inf, index=grid.index[~grid["baseline"]]))
    t = grid_table(grid, frame)
    if cfg.screen:
        t["screen_dnll"] = screen_of(t, screen)
    rows = match(grid, frame)
    measured = rows.notna().to_numpy()
    trees, oob = tree_predictions(frame, t, cfg, screen if cfg.screen else None)
    t["dnll"] = nan_reduce(np.nanmean, trees)
    if measured.any():
        t.loc[measured, "dnll"] = frame.loc[rows[measured], "dnll"].to_numpy(float)
    t.loc[t["baseline"], "dnll"] = 0.0
    t["nll"] = t["metrics.nll_fp"] + t["dnll"] if "metrics.nll_fp" in t else np.nan
    t["measured"] = measured | t["baseline"].to_numpy()
    frontier = measured_frontier(t)
    if cfg.question == "predictor":
        width = (nan_reduce(np.nanquantile, trees, q=0.95)
                 - nan_reduce(np.nanquantile, trees, q=0.05))
        score = pd.Series(np.where(np.isnan(width), np.inf, width), index=t.index)
    elif cfg.question == "pareto":
        score = pareto_score(t, trees, oob, cfg.pareto_tol, cfg.pareto_rank1)
    else:
        law = law_table(frame, cfg.law_boot, cfg.seed)
        score = law_score(t, law, cfg.law_min_dnll)
        return Answer(t, frontier, score[~t["measured"]], law)
    return Answer(t, frontier, score[~t["measured"]])


# ---- the loop -----------------------------------------------------------------------------

class Oracle(Protocol):
    def frame(self) -> pd.DataFrame: ...                    # the study's records so far
    def run(self, points: list[int]) -> pd.DataFrame: ...   # run them, the records after


@dataclass
class Step:
    batch: list[int]
    jobs: int            # jobs run so far (points with a record, or tried and failed)
    moved: float         # change of the answer since the previous fit (NaN for the first)
    frontier: list[int]
    note: str = ""


@dataclass
class History:
    cfg: DesignConfig
    grid: pd.DataFrame
    steps: list[Step] = field(default_factory=list)
    final: Answer | None = None
    stopped: str = ""

    @property
    def jobs(self) -> int:
        return self.steps[-1].jobs if self.steps else 0


def run_design(grid: pd.DataFrame, oracle: Oracle, cfg: DesignConfig,
               log: Callable[[str], None] = lambda s: None,
               screen: pd.Series | None = None) -> History:
    """Seed, then fit, answer and pick batches until the answer stops moving or the budget
    is spent. Points with a record in the store count as run (a resumed sweep re-runs
    nothing); points tried without a record (failed jobs) are not tried again. With
    ``cfg.screen``, ``screen`` must hold a value for every runnable point."""
    if grid.empty:
        raise AnalysisError("the grid has no points")
    if cfg.screen:
        _check_screen(grid, screen)
    budget = cfg.budget_jobs(len(grid))
    rng = np.random.default_rng(cfg.seed + 1)
    hist, frame, tried = History(cfg, grid), oracle.frame(), set()
    prev, calm = None, 0
    while True:
        done = set(grid.index[match(grid, frame).notna()]) | tried
        jobs = len(done & set(runnable(grid)))
        seed = [i for i in seed_design(grid, cfg) if i not in done]
        ans = answer(grid, frame, cfg, screen)
        moved = _moved(prev, ans, cfg) if not seed else math.nan
        calm = calm + 1 if moved < cfg.tol else 0   # (NaN compares False)
        prev = ans
        left = budget - jobs
        if seed:
            batch, note = seed[:left], "seed"
        else:
            batch, note = _pick(ans, cfg, rng), cfg.strategy
        batch = [i for i in batch if i not in done][:max(left, 0)]
        hist.steps.append(Step(batch, jobs, moved, ans.frontier, note))
        log(f"{jobs} jobs, answer moved {moved:.3g}: next {len(batch)} ({note})")
        why = _stop(cfg, ans, calm, left, seed, batch)
        if why:
            hist.steps[-1].batch = []
            hist.final, hist.stopped = ans, why
            log(f"stopped after {jobs} jobs: {why}")
            return hist
        frame = oracle.run(batch)
        tried |= set(batch)


def _check_screen(grid: pd.DataFrame, screen: pd.Series | None) -> None:
    if screen is None:
        raise AnalysisError("screen=true: the design needs a screen (screen_table)")
    run = grid.loc[runnable(grid)].copy()
    cols = {"model": "model.name", "data": "data.name", "format": "format.name"}
    for key, col in cols.items():   # a key not swept: the screen's one value of it
        values = screen.index.get_level_values(col).unique()
        if key not in run and len(values) != 1:
            raise AnalysisError(f"screen=true: {key} is not swept and the screen holds "
                                f"{len(values)} values of it; sweep {key} or screen one")
        if key not in run:
            run[key] = values[0]
    lacking = run[np.isnan(screen_of(run.rename(columns=cols), screen))]
    if len(lacking):
        pairs = sorted({tuple(r) for r in lacking[list(cols)].astype(str).to_numpy()})
        raise AnalysisError(f"screen=true: no screening value for {len(pairs)} (model, data, "
                            f"format) of the grid, e.g. {pairs[:3]}")


def _stop(cfg: DesignConfig, ans: Answer, calm: int, left: int, seed: list, batch) -> str:
    if left <= 0:
        return "budget spent"
    if seed:
        return ""
    if not batch:
        return "nothing left that could change the answer"
    if cfg.question in ("predictor", "law") and calm >= cfg.patience:
        return f"the answer moved less than tol={cfg.tol} for {cfg.patience} fits"
    if cfg.question == "law" and len(ans.law) and (ans.law["rel_width"] <= cfg.law_tol).all() \
            and np.isfinite(ans.score).all():
        return f"every exponent is known to +-{cfg.law_tol:.0%}"
    return ""


def _moved(prev: Answer | None, ans: Answer, cfg: DesignConfig) -> float:
    """How much the answer changed: relative mean change of the grid's dNLL (predictor), or
    the share of the frontier that changed (pareto), the largest relative change of a
    group's exponent (law)."""
    if prev is None:
        return math.nan
    if cfg.question == "law":
        return law_moved(prev.law, ans.law, ans.score) if prev.law is not None else math.inf
    if cfg.question == "pareto":
        a, b = set(prev.frontier), set(ans.frontier)
        return len(a ^ b) / max(len(a | b), 1)
    new, old = ans.table["dnll"].to_numpy(float), prev.table["dnll"].to_numpy(float)
    ok = np.isfinite(new) & np.isfinite(old)
    if not ok.any():
        return math.inf
    return float(np.mean(np.abs(new[ok] - old[ok])) / max(np.mean(np.abs(new[ok])), 1e-12))


def _pick(ans: Answer, cfg: DesignConfig, rng: np.random.Generator) -> list[int]:
    """The next batch: the highest scores (random: uniform among the points not run), at
    most one per (unit, format) pair in a batch while others are left, for spread."""
    score = ans.score
    if cfg.question == "pareto":
        score = score[score > cfg.min_gain]
    elif cfg.question == "law":
        score = score[score > 0]
    if cfg.strategy == "random":
        pool = ans.score.index.to_numpy()
        return [int(i) for i in rng.permutation(pool)[:cfg.batch_size]]
    order = score.sort_values(ascending=False, kind="stable").index
    t = ans.table
    same = [c for c in ("model.name", "data.name", "format.name") if c in t]
    chosen, seen = [], set()
    for i in order:
        key = tuple(t.loc[i, same])
        if key not in seen:
            chosen.append(int(i))
            seen.add(key)
        if len(chosen) == cfg.batch_size:
            return chosen
    rest = [int(i) for i in order if int(i) not in chosen]
    return chosen + rest[:cfg.batch_size - len(chosen)]
