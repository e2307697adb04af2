"""Sweep outcomes: every grid point gets a record, the summary is written whatever failed,
the end lists every failure and invalid point, the exit status says whether all succeeded,
and max_batch_size never stops a sweep early."""

from __future__ import annotations

import pytest
from runner_utils import FAST, run_cli

from ptqscale.store import iter_records

pytestmark = pytest.mark.slow


def model_conf(folder, max_seqlen: int):
    """conf folder with model=m: stories260k whose context is ``max_seqlen``."""
    (folder / "model").mkdir(parents=True, exist_ok=True)
    (folder / "model" / "m.yaml").write_text(
        "defaults:\n  - stories260k\n  - _self_\n"
        f"name: m\nmax_seqlen: {max_seqlen}\n")
    return folder


def test_failed_and_invalid_points_are_recorded_and_listed_and_the_sweep_goes_on(tmp_path):
    conf = model_conf(tmp_path / "conf", max_seqlen=128)     # eval.seqlen=256 > 128: invalid
    results = tmp_path / "results"
    grid = ["--multirun", "+sweep=quickstart", "model=stories260k,m", "format=int9,int8",
            f"hydra.searchpath=[file://{conf}]", "hydra.sweeper.max_batch_size=1",
            "wandb.mode=disabled", *FAST]
    out = run_cli(grid, results)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    recs = {(r["status"], r["name"]) for r in iter_records(results, "quickstart")}
    assert len(recs) == 4, recs          # max_batch_size=1: the batches after the invalid ran
    statuses = sorted(s for s, _ in recs)
    assert statuses == ["complete", "invalid", "invalid", "invalid"], recs
    assert (results / "quickstart" / "records.parquet").is_file()
    summary = (results / "quickstart" / "summary.md").read_text()
    assert "1 complete, 0 failed, 3 invalid" in summary and "format='int9'" in summary
    assert "4 jobs: 1 complete, 0 failed, 3 invalid" in out.stdout
    assert out.stdout.count("INVALID") == 3 and "eval.seqlen=256 exceeds" in out.stdout
    assert "Traceback" not in text

    # The model's context fixed in its file, the same overrides: the invalid records of the
    # points that validate now are gone; the int9 points stay invalid.
    model_conf(conf, max_seqlen=512)
    again = run_cli([*grid[:3], "format=int8", *grid[4:]], results)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    recs = [r for r in iter_records(results, "quickstart")]
    assert sorted(r["status"] for r in recs) == ["complete", "complete", "invalid", "invalid"]
    assert all("int9" in r["name"] for r in recs if r["status"] == "invalid")
    # this launch's summary lists no invalid records: the int9 ones are from an earlier launch
    assert "2 complete, 0 failed, 0 invalid" in (results / "quickstart" / "summary.md").read_text()
