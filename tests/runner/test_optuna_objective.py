"""A job returns the record metric named by ``objective`` to the sweeper, and an Optuna
study over GPTQ damping (sweeps/gptq_damp_optuna.yaml) optimizes it (issue 18)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ptqscale.runner.app import objective_value

RECORD = {"status": "complete", "name": "s/m", "metrics": {"dnll": 0.25, "nll": 4.5}}


def test_objective_is_the_named_metric_nan_when_incomplete_and_clear_when_wrong():
    assert objective_value(RECORD, "metrics.dnll") == 0.25
    assert math.isnan(objective_value({**RECORD, "status": "failed"}, "metrics.dnll"))
    with pytest.raises(KeyError, match=r"objective=metrics.dnl: no 'dnl' in metrics; it has dnll, nll"):
        objective_value(RECORD, "metrics.dnl")
    with pytest.raises(TypeError, match="not a number"):
        objective_value(RECORD, "name")


@pytest.mark.slow
def test_optuna_study_minimizes_the_returned_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cmd = [sys.executable, "-m", "ptqscale.runner.app", "+sweep=gptq_damp_optuna",
           "hydra.sweeper.n_trials=2", "eval.max_tokens=512", "eval.seqlen=256",
           "calib.nsamples=2", "calib.seqlen=128", "progress=false", "wandb.mode=disabled",
           f"paths.results={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(p.read_text())
               for p in (tmp_path / "gptq_damp_optuna" / "records").glob("*.json")]
    assert len(records) == 2                                # two trials, two damping values
    dnll = {r["config"]["method"]["percdamp"]: r["metrics"]["dnll"] for r in records}
    assert len(dnll) == 2
    best = re.search(r"Best value: (\S+)", done.stdout + done.stderr)
    assert best, done.stderr[-2000:]
    assert float(best[1]) == pytest.approx(min(dnll.values()))   # the sweeper saw metrics.dnll
    assert Path(tmp_path / "sweep" / "optimization_results.yaml").is_file()
