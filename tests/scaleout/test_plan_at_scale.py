"""``ptqscale-plan`` without composing every job: the same answers as composing each one."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ptqscale.runner import keys
from ptqscale.runner.app import conf_dir
from ptqscale.runner.config import register_configs
from ptqscale.runner.job import validate_job
from ptqscale.runner.plan import expand_sweep, plan, plan_job
from ptqscale.runner.planner import Planner
from ptqscale.store import cache_put, claim_job, write_record

SWEEPS = Path(conf_dir()).parent / "sweeps"
# group axes (model, method), value axes (format, seed), an invalid format, GPTQ's calib
PLAIN = ["model=stories260k", "method=rtn,gptq", "format=int8,int5_x,mxfp4", "seed=0,1",
         "eval.seqlen=128"]
# groups packaged @_global_, two of which write the same node (method)
GLOBAL = ["+sweep=crossquant",
          "+sweep/crossquant_model@_global_=stories260k,gutenberg-llama-200k",
          "+sweep/crossquant_bits@_global_=w8a8,w4a4",
          "+sweep/crossquant_scheme@_global_=smoothquant,crossquant"]


@contextmanager
def hydra_conf():
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        yield


def outcome(make, job):
    try:
        return make(job)
    except Exception as e:   # noqa: BLE001 - the error is part of the answer
        return f"{type(e).__name__}: {e}"


@pytest.mark.slow
@pytest.mark.parametrize("grid", [PLAIN, GLOBAL], ids=["plain", "global-groups"])
def test_every_job_specs_as_if_composed_alone(grid):
    if grid is GLOBAL and not (SWEEPS / "crossquant.yaml").is_file():
        pytest.skip("no crossquant study in this checkout")
    with hydra_conf():
        jobs = expand_sweep(grid)
        planner = Planner()
        fast = [outcome(planner.spec, job) for job in jobs]
        slow = [outcome(lambda j: validate_job(compose("config", overrides=j)), job)
                for job in jobs]
    assert fast == slow
    assert any(isinstance(s, str) for s in fast) == (grid is PLAIN)   # int5_x is invalid
    assert len(planner._composed) < len(jobs)     # it did not compose job by job


def test_plan_reads_states_from_the_store(tmp_path):
    grid = ["model=stories260k", "method=rtn", "format=int8,int5_x,mxfp4,nvfp4",
            "eval.seqlen=128", f"paths.results={tmp_path}"]
    with hydra_conf():
        jobs = expand_sweep(grid)
        planner = Planner()
        done, failed = planner.spec(jobs[0]), planner.spec(jobs[2])
    write_record(tmp_path, {"job_key": done.key, "study": done.study, "status": "complete"})
    write_record(tmp_path, {"job_key": failed.key, "study": failed.study, "status": "failed"})
    cache_put(tmp_path, "fp_eval", keys.fp_eval_key(done.model, done.data, done.eval), {})
    planned = plan(grid)
    assert [j.state for j in planned] == ["done", "invalid", "failed", "pending"]
    assert "int5_x" in planned[1].reason
    assert all(j.fp_cached for j in planned if j.state != "invalid")
    with hydra_conf():
        assert planned == [plan_job(job) for job in jobs]   # composing every job agrees


def test_plan_shows_a_job_that_a_live_process_holds_as_running(tmp_path):
    grid = ["model=stories260k", "method=rtn", "format=int8,mxfp4", "eval.seqlen=128",
            f"paths.results={tmp_path}"]
    with hydra_conf():
        spec = Planner().spec(expand_sweep(grid)[1])
    with claim_job(tmp_path, spec.study, spec.key):
        planned = plan(grid)
        with hydra_conf():
            slow = [plan_job(job).state for job in expand_sweep(grid)]
    assert [j.state for j in planned] == slow == ["pending", "running"]
    assert [j.state for j in plan(grid)] == ["pending", "pending"]   # released with the claim
