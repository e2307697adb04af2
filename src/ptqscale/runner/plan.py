"""``ptqscale-plan``: the jobs of a sweep and their state, without loading any model.

    ptqscale-plan +sweep=quickstart
    ptqscale-plan +sweep=format_scan model=zoo-xs,zoo-s

For each grid point: done / failed / pending (or invalid, with the reason), its key, and
which model-level results (full-precision eval, landscape) are already cached and will
be reused. The grid is expanded exactly as Hydra's basic sweeper expands it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ptqscale.errors import ConfigError
from ptqscale.runner import keys
from ptqscale.runner.app import conf_dir
from ptqscale.runner.config import register_configs
from ptqscale.store import cache_get, read_record


@dataclass
class PlannedJob:
    overrides: list[str]
    state: str                  # done | failed | pending | invalid
    name: str = ""
    key: str = ""
    fp_cached: bool = False
    landscape_cached: bool | None = None
    reason: str = ""


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The override list of every job, as ``--multirun`` would launch them."""
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    parsed = OverridesParser.create().parse_overrides(args)
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def plan_job(job_overrides: list[str]) -> PlannedJob:
    """Validate one grid point and look up its state in the store."""
    from ptqscale.runner.job import validate_job

    cfg = compose("config", overrides=job_overrides)
    try:
        spec = validate_job(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        return PlannedJob(job_overrides, "invalid", reason=str(e))
    record = read_record(spec.results, spec.study, spec.key)
    state = "pending" if record is None else ("done" if record["status"] == "complete" else "failed")
    fp_key = keys.fp_eval_key(spec.model, spec.data, spec.eval)
    job = PlannedJob(job_overrides, state, name=spec.name, key=spec.key,
                     fp_cached=cache_get(spec.results, "fp_eval", fp_key) is not None)
    if spec.landscape is not None:
        lkey = keys.landscape_key(spec.model, spec.data, spec.eval, spec.landscape)
        job.landscape_cached = cache_get(spec.results, "landscape", lkey) is not None
    return job


def plan(overrides: list[str]) -> list[PlannedJob]:
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return [plan_job(job) for job in expand_sweep(overrides)]


def format_plan(jobs: list[PlannedJob]) -> str:
    lines = [f"{'state':8} {'key':16} {'fp':3} {'ls':3} job"]
    for j in jobs:
        ls = "-" if j.landscape_cached is None else ("yes" if j.landscape_cached else "no")
        fp = "yes" if j.fp_cached else "no"
        what = j.name or " ".join(j.overrides)
        lines.append(f"{j.state:8} {j.key or '-':16} {fp:3} {ls:3} {what}"
                     + (f"\n         {j.reason}" if j.reason else ""))
    counts = {s: sum(j.state == s for j in jobs) for s in ("done", "failed", "pending", "invalid")}
    lines.append(f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    lines.append("fp = full-precision eval cached, ls = landscape features cached (- = not used)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptqscale-plan", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +sweep=quickstart")
    args = parser.parse_args(argv)
    jobs = plan(args.overrides)
    print(format_plan(jobs))
    return 1 if any(j.state == "invalid" for j in jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
