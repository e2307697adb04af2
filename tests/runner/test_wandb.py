"""The W&B mirror: offline fallback within seconds, retries, sync, and what a run holds.

No W&B server is reachable here: "online" is exercised against a closed local port (the
fallback) and the upload step of a sync with ``wandb sync`` replaced by a recorder.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import wandb_offline
from runner_utils import run_cli

from ptqscale.runner import tracking
from ptqscale.runner.config import WandbConfig
from ptqscale.store import iter_records, read_record, write_record
from ptqscale.store.wandb_mode import api_key_configured, resolve_mode

FAKE_KEY = "x" * 40
TINY = ["model=gutenberg-llama-200k", "data=gutenberg", "format=int8", "method=rtn",
        "eval.max_tokens=2048", "progress=false"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _record(key: str = "k1", status: str = "complete") -> dict:
    return {"job_key": key, "study": "s", "name": f"s/m/d/int4/rtn/{key}", "status": status,
            "model": {"name": "m", "family": "fam", "size": "1m"}, "data": {"name": "d"},
            "format": {"name": "int4", "bits_per_weight": 4.0}, "method": {"name": "rtn"},
            "metrics": {"nll": 3.5, "dnll": 0.1},
            "quantization": {"cost": {"peak_memory_bytes": 123, "seconds": 1.5},
                             "activations": {"kernel_proportion": 0.25}},
            "layers": [{"name": "l0", "numel": 4, "sqnr_db": 20.0, "signal": 1.0,
                        "noise": 0.01, "padded": 0, "shape": [2, 2]}],
            "wandb": {"status": "pending"}}


@pytest.fixture
def closed_server(monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)


def test_login_is_wandbs_own_lookup_for_the_configured_server(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine wandb.example.org\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert api_key_configured() and resolve_mode("auto") == "online"  # self-hosted, $NETRC
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    assert not api_key_configured() and resolve_mode("auto") == "offline"


def test_an_unreachable_server_falls_back_to_offline_within_seconds(tmp_path, closed_server):
    cfg = WandbConfig(mode="auto", dir=str(tmp_path / "wb"))
    t0 = time.perf_counter()
    state = tracking.mirror_record(_record(), cfg)
    assert time.perf_counter() - t0 < 10.0
    assert state["status"] == "offline" and "did not answer" in state["fallback"]
    summary = wandb_offline.summary(Path(state["dir"]) / "run-k1.wandb")
    assert summary["metrics/nll"] == 3.5
    assert summary["quantization/cost/peak_memory_bytes"] == 123     # measured: summary
    assert summary["quantization/activations/kernel_proportion"] == 0.25


def test_config_holds_settings_and_the_summary_what_was_measured():
    rec = _record()
    config, summary = tracking.run_config(rec), tracking.run_summary(rec)
    assert "quantization" not in config and "metrics" not in config and config["model"]["name"]
    assert summary["quantization/cost/seconds"] == 1.5 and summary["status"] == "complete"
    assert tracking.tags(rec) == ["study:s", "family:fam", "size:1m", "model:m",
                                  "format:int4", "method:rtn", "data:d"]


def test_sync_mirrors_pending_records_and_uploads_fallback_runs(tmp_path, closed_server,
                                                                monkeypatch):
    results = tmp_path / "results"
    write_record(results, _record("k1"))                               # killed before mirror
    write_record(results, _record("k2") | {"wandb": {"status": "offline",  # offline by choice
                                                      "dir": str(tmp_path / "run-k2")}})
    cfg = WandbConfig(mode="auto", dir=str(results / "_wandb"))
    counts = tracking.sync_study(str(results), "s", cfg)
    assert counts == {"mirrored": 1, "failed": 0, "uploaded": 0}     # server still down
    k1 = read_record(results, "s", "k1")["wandb"]
    assert k1["status"] == "offline" and k1["fallback"]

    synced = []                                                        # the server is back
    monkeypatch.setattr(tracking, "server_answers", lambda url, timeout=3.0: True)
    monkeypatch.setattr("subprocess.run", lambda cmd, **kw: synced.append(cmd) or
                        type("P", (), {"returncode": 0, "stderr": ""})())
    counts = tracking.sync_study(str(results), "s", cfg)
    assert counts["uploaded"] == 2 and all(cmd[1:4] == ["-m", "wandb", "sync"] for cmd in synced)
    states = {r["job_key"]: r["wandb"] for r in iter_records(results, "s")}
    assert states["k1"]["status"] == "online" and "fallback" not in states["k1"]


@pytest.mark.slow
def test_relaunch_mirrors_a_record_whose_mirror_never_ran(tmp_path):
    run_cli([*TINY, "wandb.mode=disabled"], tmp_path)
    (path,) = (tmp_path / "adhoc" / "records").glob("*.json")
    rec = json.loads(path.read_text())
    rec["wandb"] = {"status": "pending"}  # as a kill between record and mirror leaves it
    path.write_text(json.dumps(rec))
    out = run_cli([*TINY, "wandb.mode=offline"], tmp_path)
    assert out.returncode == 0 and "[skip]" in out.stdout + out.stderr
    again = json.loads(path.read_text())
    assert again["wandb"]["status"] == "offline"
    assert again["metrics"] == rec["metrics"]  # mirrored, not recomputed
