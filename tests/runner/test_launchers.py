"""The same sweep through the other launchers: joblib workers and submitit's local executor."""

from __future__ import annotations

import pytest
from runner_utils import FAST, ONE_MODEL, run_cli

from ptqscale.store import iter_records

pytestmark = pytest.mark.slow

GRID = ["--multirun", "+sweep=quickstart", ONE_MODEL, "format=int8,mxfp4", "wandb.mode=disabled",
        *FAST]


@pytest.mark.parametrize("launcher", [
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ["hydra/launcher=local_gpus"],
    ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
])
def test_launcher_completes_every_job(tmp_path, launcher):
    out = run_cli([*GRID, *launcher], tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    recs = list(iter_records(tmp_path, "quickstart"))
    assert sorted(r["format"]["name"] for r in recs) == ["int8", "mxfp4"]
    assert all(r["status"] == "complete" for r in recs)
