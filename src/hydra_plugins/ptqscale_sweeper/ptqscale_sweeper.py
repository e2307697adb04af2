"""A Hydra sweeper that runs a study's grid only where the study's question needs it.

Selected with ``hydra/sweeper=ptqscale``; the grid is ``hydra.sweeper.params`` as for the
basic sweeper (the studies in sweeps/ work unchanged). It runs a seed design, fits the
study's predictor on the store's records, hands the launcher (any: basic, joblib,
submitit) the batch where the answer is most uncertain, and stops when the answer stops
moving or ``budget`` jobs have run (ptqscale_analysis.active decides; docs/sweeper.md).
The store is its memory: points with a complete record count as run and are never handed
out again, so a sweep resumes where it stopped. ``replay=true`` runs no job: it replays
the design on the study's records already in the store ("what would it have done").

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
    pareto_rank1: bool = True          # pareto: the rank-1 opinion beside the forest's
    law_tol: float = 0.1               # law: every exponent known to +- this (relative)
    law_boot: int = 50                 # law: bootstrap resamples of each fit
    law_min_dnll: float = 0.002        # law: points predicted below this are not worth a job
    unit_keys: list[str] = field(default_factory=lambda: ["model", "data"])
    n_estimators: int = 100
    strategy: str = "guided"           # or random (a baseline design)
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
        from ptqscale_analysis.replay import ReplayOracle

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
        if self.replay:
            full = store_frame(root, study)
            if full.empty:
                raise ValueError(f"replay=true needs records of study {study!r} under {root}")
            oracle = ReplayOracle(full, grid)
        else:
            oracle = _LiveOracle(self, root, study)
        history = run_design(grid, oracle, self.design, log=log.info)
        self._write_log(sweep_dir, history)
        return history

    def launch(self, points: list[int]) -> None:
        """Hand the launcher one batch: each point's swept values plus the fixed overrides."""
        keys = [k for k in self.grid.columns if k != "baseline"]
        batch = [[f"{k}={self.grid.at[i, k]}" for k in keys] + self.fixed for i in points]
        self.validate_batch_is_legal(batch)
        for r in self.launcher.launch(batch, initial_job_idx=self.job_idx):
            _ = r.return_value   # an exception of the task reaches the caller, as Hydra's do
        self.job_idx += len(batch)

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
