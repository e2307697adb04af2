"""The Hydra sweeper plugin (hydra/sweeper=ptqscale): found by Hydra, reads a grid like the
basic sweeper, and drives real jobs on embedded members for a few batches on CPU: seed,
guided batches, a resumed sweep that re-runs nothing, and a replay that runs nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from hydra_plugins.ptqscale_sweeper.ptqscale_sweeper import PtqscaleSweeper, expand, make_grid
from ptqscale.store import iter_records

FAST = ["eval.max_tokens=2048", "eval.seqlen=256", "progress=false", "wandb.mode=disabled"]
FORMATS = "bf16,int8,int4_g128,int3_g128,mxfp4,nf4"


def test_hydra_discovers_the_sweeper():
    """As ``ptqscale-run`` starts Hydra: in a fresh process (Hydra scans plugins once), from
    an editable install too (tests run from one: setuptools' import hook, not a folder)."""
    code = ("from ptqscale.runner.app import plugins_discoverable; plugins_discoverable(); "
            "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
            "print(sorted(f'{c.__module__}.{c.__name__}' for c in Plugins.instance()"
            ".discover(Sweeper)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items()
                                           if k != "PYTHONPATH"})
    assert f"{PtqscaleSweeper.__module__}.PtqscaleSweeper" in out.stdout, out.stderr[-2000:]


def test_grid_from_overrides_later_wins_and_baselines_are_flagged():
    parser = OverridesParser.create()
    swept, fixed = expand(parser, ["model=a,b,c", "format=bf16,int4_g128", "model=a,b",
                                   "method=rtn", "eval.seqlen=choice(256)"])
    assert swept == {"model": ["a", "b"], "format": ["bf16", "int4_g128"]}
    assert fixed == ["method=rtn", "eval.seqlen=256"]
    grid = make_grid(swept)
    assert len(grid) == 4
    assert grid.loc[grid["format"] == "bf16", "baseline"].all()
    assert not grid.loc[grid["format"] == "int4_g128", "baseline"].any()
    with pytest.raises(ValueError, match="needs a list of values"):
        expand(parser, ["method.percdamp=interval(0.001, 1.0)"])


def run(results, *extra, timeout=600):
    cmd = [sys.executable, "-m", "ptqscale.runner.app", "--multirun", "study=sweeper_e2e",
           "hydra/sweeper=ptqscale", "model=gutenberg-llama-200k,stories260k", "data=gutenberg",
           "method=rtn", f"format={FORMATS}", "hydra.sweeper.budget=8",
           "hydra.sweeper.batch_size=2", *FAST, *extra, f"paths.results={results}"]
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_API_KEY": ""}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    logs = sorted((results / "_hydra" / "sweeper_e2e" / "multirun").glob("*/ptqscale_sweeper.json"))
    return json.loads(logs[-1].read_text()), out


def records(results):
    return {r["name"]: r for r in iter_records(results, "sweeper_e2e")}


@pytest.mark.slow
def test_sweeper_runs_real_jobs_resumes_and_replays(tmp_path):
    results = tmp_path / "results"
    log, _ = run(results)
    recs = records(results)
    # 12 points, 2 of them bf16 baselines (never run): seed of 5 (every format once, both
    # models), then guided batches of 2 until the budget of 8 jobs is spent
    assert log["grid"] == 12 and log["jobs"] == 8 == len(recs), log
    assert all(r["status"] == "complete" for r in recs.values())
    assert not any("bf16" in name for name in recs)
    notes = [s["note"] for s in log["steps"]]
    assert notes[0] == "seed" and "guided" in notes and log["stopped"] == "budget spent"
    assert len(log["steps"][0]["batch"]) == 5
    ran = [p for s in log["steps"] for p in s["batch"]]
    assert len(ran) == len(set(ran)) == 8
    assert {p.split("format=")[1] for p in log["steps"][0]["batch"]} == set(FORMATS.split(",")[1:])

    # resumed: the store is the memory, nothing runs again (no record is rewritten)
    stamps = {p: p.stat().st_mtime_ns for p in (results / "sweeper_e2e").rglob("*.json")}
    again, _ = run(results)
    assert again["jobs"] == 8 and again["steps"][0]["batch"] == [] and len(again["steps"]) == 1
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # a larger budget continues where the sweep stopped
    more, _ = run(results, "hydra.sweeper.budget=10")
    assert more["jobs"] == 10 == len(records(results))
    assert more["steps"][0]["note"] == "guided"

    # replay: the same design on the store's records, no job run
    stamps = {p: p.stat().st_mtime_ns for p in (results / "sweeper_e2e").rglob("*.json")}
    replay, _ = run(results, "hydra.sweeper.replay=true", "hydra.sweeper.question=pareto",
                    "hydra.sweeper.pareto_rank1=false")
    assert replay["replay"] is True and replay["design"]["question"] == "pareto"
    assert replay["design"]["pareto_rank1"] is False   # every setting in the design log
    assert replay["jobs"] <= 8 and replay["frontier"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert len(records(results)) == 10


@pytest.mark.slow
def test_screened_sweep_screens_every_point_first_then_designs(tmp_path):
    """screen=true: before the design, one RTN job per (model, format) into
    ``<study>_screen`` with the metric first_order and the study's evaluation budget (here
    2,048 tokens, under first_order's 16,384). An RTN job of the study measuring first_order
    finds the very value its screen did; a resumed sweep screens nothing again."""
    results = tmp_path / "results"
    log, _ = run(results, "hydra.sweeper.screen=true", "hydra.sweeper.question=pareto",
                 "hydra.sweeper.budget=4", "metrics=[nll,weight_sqnr,model_bytes,first_order]")
    screens = {r["name"].split("/", 1)[1]: r for r in iter_records(results, "sweeper_e2e_screen")}
    assert len(screens) == 10   # 2 models x 5 quantized formats; no bf16
    assert all(r["status"] == "complete" and r["method"]["name"] == "rtn"
               and r["eval"]["max_tokens"] == 2048
               and r["metrics"]["first_order_dnll"] is not None for r in screens.values())
    recs = records(results)
    assert log["design"]["screen"] is True and log["jobs"] == 4 == len(recs)
    for name, r in recs.items():
        assert r["metrics"]["first_order_dnll"] == \
            screens[name.split("/", 1)[1]]["metrics"]["first_order_dnll"]
    stamps = {p: p.stat().st_mtime_ns for p in (results / "sweeper_e2e_screen").rglob("*.json")}
    again, out = run(results, "hydra.sweeper.screen=true", "hydra.sweeper.question=pareto",
                     "hydra.sweeper.budget=4", "metrics=[nll,weight_sqnr,model_bytes,first_order]")
    assert "screening 0 of 10" in out.stdout + out.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and again["jobs"] == 4
