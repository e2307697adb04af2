"""A Hydra sweeper that runs a study's grid only where the study's question needs it.

Selected with ``hydra/sweeper=ptqscale``; the grid is ``hydra.sweeper.params`` as for the
basic sweeper (the studies in sweeps/ work unchanged). It runs a seed design, fits the
study's predictor on the store's records, hands the launcher (any: basic, joblib,
submitit) the batch where the answer is most uncertain, and stops when the answer stops
moving or ``budget`` jobs have run (ptqscale_analysis.active decides; docs/sweeper.md).
The store is its memory: points with a complete record count as run and are never handed
out again, so a sweep resumes where it stopped. ``replay=true`` runs no job: it replays
the design on the study's records already in the store ("what would it have done").
``screen=true`` first runs a screening stage: RTN into each format of the grid for each model
and corpus, the evaluation cut to the metric ``first_order``'s gradient budget, into the study
``<study>_screen``; the design then knows every point's first-order damage before it runs
(ptqscale_analysis.active, "screen").

    ptqscale-run +sweep=quickstart hydra/sweeper=ptqscale hydra.sweeper.question=pareto
"""

# No `from __future__ import annotations`: Hydra executes plugin modules outside
# sys.modules while scanning, where a dataclass with string annotations cannot resolve them.
import itertools
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class PtqscaleSweeperConf:
    """The sweeper's settings; every one is written to the sweep's design log."""

    _target_: str = "hydra_plugins.ptqscale_sweeper.ptqscale_sweeper.PtqscaleSweeper"
    params: dict[str, str] | None = None
    question: str = "predictor"        # predictor | pareto | law
    budget: float = 0.3                # jobs: a count >= 1, or a fraction of the grid
    batch_size: int = 8
    seed: int = 0
    tol: float = 0.05                  # predictor: relative change that counts as still
    patience: int = 2                  # ... and for how many fits in a row
    pareto_tol: float = 0.0            # pareto: the NLL resolution wanted (nats)
    min_gain: float = 1e-4             # pareto: least expected improvement worth a job
    pareto_rank1: bool | None = None   # pareto: the rank-1 opinion (None: unless screened)
    law_tol: float = 0.1               # law: every exponent known to +- this (relative)
    law_boot: int = 50                 # law: bootstrap resamples of each fit
    law_min_dnll: float = 0.002        # law: points predicted below this are not worth a job
    unit_keys: list[str] = field(default_factory=lambda: ["model", "data"])
    n_estimators: int = 100
    strategy: str = "guided"           # or random (a baseline design)
    screen: bool = False               # screen every point first (RTN g.e, <study>_screen)
    replay: bool = False               # answer from the store's records, run nothing


ConfigStore.instance().store(group="hydra/sweeper", name="ptqscale", node=PtqscaleSweeperConf,
                             provider="ptqscale")


def expand(parser: OverridesParser, overrides: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Hydra overrides -> (swept key -> its values, the fixed overrides every job gets).

    A later override of a key replaces an earlier one (a command-line ``model=a`` fixes a
    model the study's params sweep), as with the basic sweeper; one value is fixed.
    """
    values: dict[str, list[str]] = {}
    for o in parser.parse_overrides(overrides):
        key = o.get_key_element()
        if not o.is_sweep_override():
            values[key] = [o.get_value_element_as_str()]
        elif o.is_discrete_sweep():
            values[key] = list(o.sweep_string_iterator())
        else:
            raise ValueError(f"hydra/sweeper=ptqscale sweeps a grid: {key} needs a list of "
                             f"values (a,b,c), not a {o.value_type.name}")
    swept = {k: v for k, v in values.items() if len(v) > 1}
    return swept, [f"{k}={v[0]}" for k, v in values.items() if len(v) == 1]


def is_baseline(point: dict[str, str]) -> bool:
    """A point whose answer every job of its model measures: a 16-bit format, method none."""
    from ptqscale.formats import get_format

    if point.get("method") == "none":
        return True
    try:
        return "format" in point and get_format(point["format"]).family == "baseline"
    except Exception:   # noqa: BLE001 - a bad name is the job's to report (invalid record)
        return False


def make_grid(swept: dict[str, list[str]]) -> pd.DataFrame:
    """Every combination of the swept values, one row per point, with its baseline flag."""
    keys = list(swept)
    grid = pd.DataFrame(list(itertools.product(*swept.values())), columns=keys)
    grid["baseline"] = [is_baseline(dict(zip(keys, row))) for row in grid[keys].itertuples(
        index=False)]
    return grid


def store_frame(root: str, study: str) -> pd.DataFrame:
    """The study's complete records (empty before the first)."""
    from ptqscale_analysis.errors import AnalysisError
    from ptqscale_analysis.load import load_study

    try:
        return load_study(root, study)
    except AnalysisError:
        return pd.DataFrame()


class PtqscaleSweeper(Sweeper):
    def __init__(self, params: dict[str, str] | None = None, replay: bool = False,
                 **design: Any) -> None:
        from ptqscale_analysis.active import DesignConfig

        self.params = dict(params or {})
        self.replay = replay
        self.design = DesignConfig(**{**design, "unit_keys": tuple(design.get("unit_keys",
                                                                             ("model", "data")))})
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from ptqscale_analysis.active import run_design
        from ptqscale_analysis.replay import ReplayOracle, replay_screen

        assert self.config is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        swept, self.fixed = expand(parser, [f"{k}={v}" for k, v in self.params.items()]
                                   + list(arguments))
        if not swept:
            raise ValueError("hydra/sweeper=ptqscale needs a grid: hydra.sweeper.params or "
                             "overrides with several values (model=a,b)")
        grid = make_grid(swept)
        self.grid = grid
        root, study = str(self.config.paths.results), str(self.config.study)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        screen = None
        if self.replay:
            full = store_frame(root, study)
            if full.empty:
                raise ValueError(f"replay=true needs records of study {study!r} under {root}")
            oracle = ReplayOracle(full, grid)
            screen = replay_screen(full, self.design)
        else:
            oracle = _LiveOracle(self, root, study)
            if self.design.screen:
                screen = self.run_screen(root, study)
        history = run_design(grid, oracle, self.design, log=log.info, screen=screen)
        self._write_log(sweep_dir, history)
        return history

    def launch(self, points: list[int]) -> None:
        """Hand the launcher one batch: each point's swept values plus the fixed overrides."""
        keys = [k for k in self.grid.columns if k != "baseline"]
        self._launch([[f"{k}={self.grid.at[i, k]}" for k in keys] + self.fixed for i in points])

    def _launch(self, batch: list[list[str]]) -> None:
        self.validate_batch_is_legal(batch)
        for r in self.launcher.launch(batch, initial_job_idx=self.job_idx):
            _ = r.return_value   # an exception of the task reaches the caller, as Hydra's do
        self.job_idx += len(batch)

    def run_screen(self, root: str, study: str) -> pd.Series:
        """The screening stage: one RTN job per (model, corpus, format) of the grid's runnable
        points, into ``<study>_screen``, with the metric ``first_order`` and the evaluation cut
        to its gradient budget (the study's own ``eval.max_tokens`` where smaller): about that
        budget's share of a job each, plus one gradient per model and corpus. Those already in
        the store are not run again. Returns their :func:`screen_table`."""
        from ptqscale.metrics.first_order import MAX_TOKENS
        from ptqscale_analysis.active import runnable, screen_table

        screen_study = f"{study}_screen"
        units = [k for k in ("model", "data", "format") if k in self.grid.columns]
        if "format" not in units:
            raise ValueError("hydra.sweeper.screen=true needs format among the swept keys")
        points = self.grid.loc[runnable(self.grid), units].drop_duplicates()
        tokens = MAX_TOKENS
        replaced = ("study", "method", "metrics", "eval.max_tokens")
        fixed = []
        for o in self.fixed:
            key, value = o.split("=", 1)
            if key == "eval.max_tokens" and value.isdigit():
                tokens = min(tokens, int(value))
            if key not in replaced:
                fixed.append(o)
        done = store_frame(root, screen_study)
        table = screen_table(done) if not done.empty else pd.Series(dtype=float)
        have = set(table.index.to_frame()[[f"{k}.name" for k in units]].itertuples(
            index=False, name=None)) if len(table) else set()
        batch = [[f"{k}={v}" for k, v in zip(units, row)] + fixed + [
                     f"study={screen_study}", "method=rtn", "metrics=[nll,first_order]",
                     f"eval.max_tokens={tokens}"]
                 for row in points.astype(str).itertuples(index=False) if tuple(row) not in have]
        log.info("ptqscale sweeper: screening %d of %d (model, data, format) points into %s",
                 len(batch), len(points), screen_study)
        if not batch:
            return table
        self._launch(batch)
        return screen_table(store_frame(root, screen_study))

    def _write_log(self, sweep_dir: Path, history) -> None:
        keys = [k for k in self.grid.columns if k != "baseline"]

        def names(ids):
            return [",".join(f"{k}={self.grid.at[i, k]}" for k in keys) for i in ids]

        out = {"design": asdict(self.design), "replay": self.replay, "grid": len(self.grid),
               "jobs": history.jobs, "stopped": history.stopped,
               "steps": [{"jobs": s.jobs, "moved": _finite(s.moved), "note": s.note,
                          "batch": names(s.batch)} for s in history.steps],
               "frontier": names(history.final.frontier) if history.final else []}
        path = sweep_dir / "ptqscale_sweeper.json"
        path.write_text(json.dumps(out, indent=1))
        log.info("ptqscale sweeper: %d of %d jobs, %s; design log %s", history.jobs,
                 len(self.grid), history.stopped, path)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None   # JSON has no NaN / Infinity


class _LiveOracle:
    """Real jobs through the sweeper's launcher; what they measured is read from the store."""

    def __init__(self, sweeper: PtqscaleSweeper, root: str, study: str):
        self.sweeper, self.root, self.study = sweeper, root, study

    def frame(self) -> pd.DataFrame:
        return store_frame(self.root, self.study)

    def run(self, points: list[int]) -> pd.DataFrame:
        self.sweeper.launch(points)
        return self.frame()
