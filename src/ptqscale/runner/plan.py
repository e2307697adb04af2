"""``ptqscale-plan``: the jobs of a sweep and their state, without loading any model.

    ptqscale-plan +sweep=quickstart
    ptqscale-plan +sweep=format_scan model=zoo-xs,zoo-s
    ptqscale-plan -cd my_conf +sweep=my_study      # Hydra's -cd/--config-dir, -cn as in ptqscale-run

For each grid point: done / failed / pending / running (a live process holds its claim)
or invalid (with the reason), its key, which model-level results (full-precision eval,
landscape) are already cached and will be reused, and its estimated GPU cost on an H200
(runner/cost.py: seconds, peak GiB, placement; model-level stages counted for the first job
of their model only). The grid is expanded exactly as Hydra's basic sweeper expands it.
``--format json`` prints the same as JSON.

A study can have 10^5 grid points: the jobs' specs come from the planner
(runner/planner.py: one composition per distinct group choice, not per job), and the
store and the caches are listed once per plan.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ptqscale.errors import ConfigError
from ptqscale.runner import cost, keys
from ptqscale.runner.config import register_configs
from ptqscale.runner.planner import INVALID, Planner, compose, hydra_context
from ptqscale.store import record_states, running_claims


@dataclass
class PlannedJob:
    overrides: list[str]
    state: str                  # done | failed | pending | needs-download | running | invalid
    name: str = ""
    key: str = ""
    fp_cached: bool = False
    landscape_cached: bool | None = None
    reason: str = ""
    # estimated GPU cost (runner/cost.py): seconds of the stages this job pays (a model-level
    # stage: the first not-done job of its model), peak GiB, placement; None + why otherwise
    gpu_seconds: float | None = None
    peak_gib: float | None = None
    placement: str | None = None
    fits_gpu: bool | None = None
    stages: dict[str, float] = field(default_factory=dict)
    no_estimate: str = ""


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The override list of every job, as ``--multirun`` would launch them."""
    parser = OverridesParser.create()
    # compose refuses sweeps (model=a,b) outside --multirun; the study's own grid is all
    # it needs to read here
    fixed = [o.input_line for o in parser.parse_overrides(list(overrides))
             if not o.is_sweep_override()]
    cfg = compose(overrides=fixed, return_hydra_config=True)
    sweeper = OmegaConf.select(cfg, "hydra.sweeper._target_") or ""
    if not sweeper.endswith("BasicSweeper"):
        # an optimizer (Optuna) picks its trials as it goes: there is no grid to list
        raise ConfigError(f"study {cfg.study}: its sweeper is {sweeper}; ptqscale-plan lists "
                          "the jobs of grid studies (Hydra's basic sweeper) only")
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    parsed = parser.parse_overrides(args)
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def plan_job(job_overrides: list[str]) -> PlannedJob:
    """Validate one grid point and look up its state in the store (composes it: slow)."""
    from ptqscale.runner.job import validate_job

    return _planned(job_overrides, lambda: validate_job(compose(overrides=job_overrides)),
                    _Store(), costs=_Costs())


def plan(overrides: list[str], config_dir: str | None = None,
         config_name: str = "config") -> list[PlannedJob]:
    """Every job of the sweep ``overrides`` describes, with its state."""
    register_configs()
    with hydra_context(config_dir, config_name):
        planner, store, costs = Planner(), _Store(), _Costs()
        return [_planned(job, lambda j=job: planner.spec(j), store, planner.memo, costs)
                for job in expand_sweep(overrides)]


def _now(key: tuple, make: Callable[[], Any]) -> Any:
    return make()


def _planned(job_overrides: list[str], spec_of: Callable[[], Any], store: _Store,
             memo: Callable[[tuple, Callable[[], Any]], Any] = _now,
             costs: _Costs | None = None) -> PlannedJob:
    """The job's state: its record, a live claim, and the model-level caches it will reuse.

    ``memo`` shares key computations between jobs that hold the same config objects."""
    try:
        spec = spec_of()
    except INVALID as e:
        return PlannedJob(job_overrides, "invalid", reason=str(e))
    status = store.once(("records", spec.results, spec.study),
                        lambda: record_states(spec.results, spec.study)).get(spec.key)
    state = {None: "pending", "complete": "done"}.get(status, "failed")
    if state != "done" and spec.key in store.once(
            ("claims", spec.results, spec.study),
            lambda: running_claims(spec.results, spec.study)):
        state = "running"
    if state == "pending" and spec.needs_download:
        state = "needs-download"   # a hub model not in the local cache: the run fetches it
    fp_key = memo(("fp", id(spec.model), id(spec.data), id(spec.eval)),
                  lambda: keys.fp_eval_key(spec.model, spec.data, spec.eval, spec.files))
    job = PlannedJob(job_overrides, state, name=spec.name, key=spec.key,
                     fp_cached=fp_key in store.cached(spec.results, "fp_eval"))
    lkey = None
    if spec.landscape is not None:
        lkey = memo(("lkey", id(spec.model), id(spec.data), id(spec.eval), id(spec.landscape)),
                    lambda: keys.landscape_key(spec.model, spec.data, spec.eval,
                                               spec.landscape, spec.files))
        job.landscape_cached = lkey in store.cached(spec.results, "landscape")
    if costs is not None and state not in ("done", "running"):
        costs.estimate(job, spec, fp_key, lkey)
    return job


class _Costs:
    """Each job's estimate; a model-level stage is charged to the first job that computes it."""

    def __init__(self) -> None:
        self.model = cost.load_cost_model()
        self._charged: set[str] = set()

    def estimate(self, job: PlannedJob, spec: Any, fp_key: str, lkey: str | None) -> None:
        est = cost.estimate_job(self.model, spec)
        if est.placement is None:
            job.no_estimate = est.reason
            return
        pays = {"fp": not job.fp_cached and fp_key not in self._charged,
                "landscape": lkey is not None and not job.landscape_cached
                and lkey not in self._charged}
        self._charged |= {key for key, paid in ((fp_key, pays["fp"]), (lkey, pays["landscape"]))
                          if paid}
        peaks = []
        for s in est.stages:
            fp_level = s.stage in ("eval", "fidelity")   # charged with the model's fp pass
            if s.model_level and not pays["fp" if fp_level else "landscape"]:
                continue
            name = f"fp_{s.stage}" if s.model_level and fp_level else s.stage
            job.stages[name] = job.stages.get(name, 0.0) + s.seconds
            peaks += [s.peak_gib] if s.peak_gib is not None else []
        job.gpu_seconds = sum(job.stages.values())
        job.peak_gib = max(peaks) if peaks else None
        job.placement, job.fits_gpu = est.placement, cost.fits(self.model, job.peak_gib)


class _Store:
    """The store's listings (records, claims, cache entries), each read once per plan."""

    def __init__(self) -> None:
        self._listed: dict[tuple, Any] = {}

    def once(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self._listed:
            self._listed[key] = make()
        return self._listed[key]

    def cached(self, results: str, kind: str) -> set[str]:
        """Keys of the model-level cache ``kind`` (one directory listing)."""
        def scan() -> set[str]:
            folder = Path(results) / "_cache" / kind
            return {p.name[:-5] for p in folder.glob("*.json")} if folder.is_dir() else set()
        return self.once(("cache", results, kind), scan)


STATES = ("done", "failed", "pending", "needs-download", "running", "invalid")


def totals(jobs: list[PlannedJob]) -> dict:
    """Job counts by state and the estimated GPU cost of the jobs still to run."""
    todo = [j for j in jobs if j.state not in ("done", "running", "invalid")]
    est = [j for j in todo if j.gpu_seconds is not None]
    peaks = [j.peak_gib for j in est if j.peak_gib is not None]
    return {"jobs": len(jobs), **{s: sum(j.state == s for j in jobs) for s in STATES},
            "gpu_hours": sum(j.gpu_seconds for j in est) / 3600, "estimated": len(est),
            "no_estimate": len(todo) - len(est), "max_peak_gib": max(peaks) if peaks else None,
            "streamed": sum(j.placement == "streamed" for j in est),
            "not_fitting": sum(j.fits_gpu is False for j in est)}


def format_plan(jobs: list[PlannedJob]) -> str:
    lines = [f"{'state':14} {'key':16} {'fp':3} {'ls':3} {'GPU s':>8} {'peak GiB':>8} "
             f"{'placement':9} job"]
    for j in jobs:
        ls = "-" if j.landscape_cached is None else ("yes" if j.landscape_cached else "no")
        fp = "yes" if j.fp_cached else "no"
        what = j.name or " ".join(j.overrides)
        secs = "-" if j.gpu_seconds is None else f"{j.gpu_seconds:.1f}"
        peak = "-" if j.peak_gib is None else f"{j.peak_gib:.1f}"
        place = (j.placement or "-") + ("!" if j.fits_gpu is False else "")
        lines.append(f"{j.state:14} {j.key or '-':16} {fp:3} {ls:3} {secs:>8} {peak:>8} "
                     f"{place:9} {what}")
        for note in (j.reason, j.no_estimate and f"no estimate: {j.no_estimate}"):
            if note:
                lines.append(f"               {note}")
    t = totals(jobs)
    lines.append(f"{len(jobs)} jobs: " + ", ".join(f"{t[s]} {s}" for s in STATES))
    peak = "-" if t["max_peak_gib"] is None else f"{t['max_peak_gib']:.1f}"
    lines.append(f"estimated GPU time of the jobs to run: {t['gpu_hours']:.2f} GPU-hours "
                 f"({t['estimated']} estimated, {t['no_estimate']} without an estimate); "
                 f"largest peak {peak} GiB; {t['streamed']} streamed"
                 + (f"; {t['not_fitting']} do not fit with placement=one (!)"
                    if t["not_fitting"] else ""))
    lines.append("fp = full-precision eval cached, ls = landscape features cached (- = not used); "
                 "GPU s and peak: on an H200, from runner/cost.py's fit to our benchmarks "
                 "(model-level stages on the first job of their model; loading not included)")
    return "\n".join(lines)


def plan_json(jobs: list[PlannedJob]) -> str:
    """The plan as JSON: every job and the totals."""
    model = cost.load_cost_model() or {}
    return json.dumps({"jobs": [asdict(j) for j in jobs], "totals": totals(jobs),
                       "cost_model": {k: model.get(k) for k in ("devices", "dates", "gpu")}},
                      indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptqscale-plan", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +sweep=quickstart")
    # Hydra's own flags, so that a ptqscale-run command line plans as it is
    parser.add_argument("-cd", "--config-dir", help="extra config folder, searched first")
    parser.add_argument("-cn", "--config-name", default="config", help="root config name")
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="accepted and ignored: the plan is always of the whole grid")
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="text (a table, the default) or json")
    args = parser.parse_args(argv)
    try:
        jobs = plan(args.overrides, args.config_dir, args.config_name)
    except Exception as e:  # noqa: BLE001 - a bad sweep is one line, as in ptqscale-run
        from ptqscale.runner.app import is_bad_input, report_error

        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not is_bad_input(e):
            raise
        return report_error(e)
    print(plan_json(jobs) if args.format == "json" else format_plan(jobs))
    return 1 if any(j.state == "invalid" for j in jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
