"""End-to-end jobs on stories260K: records, skips, failures, kills, determinism, W&B."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import wandb_offline
from runner_utils import FAST, ONE_MODEL, run_cli
from test_golden_keys import _recomputed_key

from ptqscale.runner.job import run_job
from ptqscale.store import iter_records, read_records
from ptqscale.store.schema import record_problems

pytestmark = pytest.mark.slow

GRID = ["+sweep=quickstart", ONE_MODEL, "format=int8,int4_g128,mxfp4", *FAST]


def records(root: Path, study: str = "quickstart") -> list[dict]:
    return list(iter_records(root, study))


def test_single_job_writes_the_record_fields(composed, tmp_path):
    cfg = composed(["method=rtn", "format=int4_g128", f"paths.results={tmp_path}",
                    "wandb.mode=disabled", *FAST])
    rec = run_job(cfg)
    assert rec["status"] == "complete"
    for field in ("nll", "perplexity", "nll_sum", "tokens", "nll_fp", "dnll", "weight_sqnr_db",
                  "model_bytes"):
        assert field in rec["metrics"], field
    m = rec["metrics"]
    assert m["nll"] == pytest.approx(m["nll_sum"] / m["tokens"])
    assert m["dnll"] > 0 and 5 < m["weight_sqnr_db"] < 30
    # standard errors (windows as draws; tests/metrics/test_perplexity.py checks them): the
    # paired dNLL's below NLL's, and int4's damage resolved (8 windows: 0.164 +- 0.028)
    assert 0 < m["dnll_se"] < m["nll_se"] and m["dnll"] > 3 * m["dnll_se"]
    assert rec["protocol_version"] == 1 and rec["model"]["name"] == "stories260k"
    assert rec["format"]["bits_per_weight"] == pytest.approx(4 + 16 / 128)
    assert len(rec["layers"]) == 35   # 5 blocks x (q, k, v, o, gate, up, down)
    # the head and embeddings stay in full precision unless asked
    assert not any("embed" in layer["name"] or "lm_head" in layer["name"] for layer in rec["layers"])
    # the record is what store/schema.py declares, with the format named once, and its key
    # comes back from its stored config (the format name put back by job_config)
    stored = next(iter_records(tmp_path))
    assert record_problems(stored) == [] and stored["format"]["name"] == "int4_g128"
    assert "format" not in stored["method"] and "format" not in stored["quantization"]
    assert "format" not in stored["config"] and "format" not in stored["config"]["method"]
    assert _recomputed_key(stored) == stored["job_key"]


def test_same_config_twice_gives_bitwise_identical_nll(composed, tmp_path):
    nll = []
    for run in ("a", "b"):
        cfg = composed(["method=rtn", "format=mxfp4", f"paths.results={tmp_path / run}",
                        "wandb.mode=disabled", *FAST])
        nll.append(run_job(cfg)["metrics"]["nll"])
    assert nll[0] == nll[1]


def test_sweep_skips_done_jobs_and_shares_the_fp_eval(tmp_path):
    first = run_cli(["--multirun", *GRID, "wandb.mode=disabled"], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    recs = records(tmp_path)
    assert len(recs) == 3 and all(r["status"] == "complete" for r in recs)
    assert sorted(r["metrics"]["fp_cached"] for r in recs) == [False, True, True]
    assert "summary:" in first.stdout and (tmp_path / "quickstart" / "summary.md").is_file()
    # the analysis report renders on these quickstart records and its figures open
    import matplotlib.image as mpimg

    from ptqscale_analysis.report import write_report

    write_report(tmp_path, "quickstart", tmp_path / "report")
    assert "jobs differ from full precision by more than 2 SE" in \
        (tmp_path / "report" / "report.md").read_text()
    pngs = list((tmp_path / "report" / "figures").glob("*.png"))
    assert pngs and all(mpimg.imread(p).std() > 0 for p in pngs)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "quickstart" / "records").iterdir()}
    again = run_cli(["--multirun", *GRID, "wandb.mode=disabled"], tmp_path)
    assert again.returncode == 0
    assert again.stderr.count("[skip]") + again.stdout.count("[skip]") == 3
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}


@pytest.fixture
def broken_model_conf(tmp_path, shared_data) -> Path:
    """A config folder adding model=broken: a checkpoint whose weights file is corrupt."""
    ckpt = tmp_path / "broken-ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 64,
                                                  "hidden_size": 16, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2,
                                                  "intermediate_size": 32}))
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    (ckpt / "tokenizer.json").write_text("{}")
    conf = tmp_path / "extra_conf" / "model"
    conf.mkdir(parents=True)
    (conf / "broken.yaml").write_text(f"name: broken\npath: {ckpt}\n")
    return conf.parent


def test_failing_job_leaves_a_failure_record_and_the_sweep_goes_on(tmp_path, broken_model_conf):
    results = tmp_path / "results"
    grid = ["--multirun", "+sweep=quickstart", "model=stories260k,broken", "format=int8",
            f"hydra.searchpath=[file://{broken_model_conf}]", "wandb.mode=disabled", *FAST]
    out = run_cli(grid, results)
    assert out.returncode == 1
    # the summary is written whatever failed, and the end of the sweep names the failure
    assert (results / "quickstart" / "summary.md").is_file()
    assert "FAILED quickstart/broken" in out.stdout and "Traceback" not in out.stdout
    by_model = {r["model"]["name"]: r for r in records(results)}
    assert by_model["stories260k"]["status"] == "complete"
    failed = by_model["broken"]
    assert failed["status"] == "failed" and failed["error"]["type"] and failed["error"]["traceback"]
    assert failed["config"]["model"]["name"] == "broken"
    again = run_cli(grid, results)
    assert again.returncode != 0
    log = again.stdout + again.stderr
    assert "[skip] quickstart/stories260k" in log and "[failed] quickstart/broken" in log


def test_kill_and_relaunch_leaves_exactly_one_complete_record_per_job(tmp_path):
    grid = ["--multirun", "+sweep=quickstart", ONE_MODEL, "format=int8,int4_g128,mxfp4,nf4",
            "wandb.mode=disabled", *FAST]
    for delay in (4.0, 9.0, 14.0):   # during startup, the first jobs, later jobs
        proc = run_cli(grid, tmp_path, wait=False)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = run_cli(grid, tmp_path)
    assert final.returncode == 0, final.stdout[-3000:]
    files = list((tmp_path / "quickstart" / "records").iterdir())
    assert all(f.suffix == ".json" and not f.name.startswith(".") for f in files), files
    recs = records(tmp_path)
    assert len(recs) == 4 and all(r["status"] == "complete" for r in recs)
    assert len({r["job_key"] for r in recs}) == 4


def test_wandb_offline_runs_hold_the_metrics(tmp_path):
    out = run_cli(["--multirun", "+sweep=quickstart", ONE_MODEL, "format=int8,mxfp4", "wandb.mode=offline",
                   *FAST], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for rec in records(tmp_path):
        assert rec["wandb"]["status"] == "offline"
        logged = wandb_offline.summary(Path(rec["wandb"]["dir"]) / f"run-{rec['job_key']}.wandb")
        assert logged["metrics/nll"] == rec["metrics"]["nll"]
        assert logged["metrics/weight_sqnr_db"] == rec["metrics"]["weight_sqnr_db"]
        assert logged["params/total"] == rec["params"]["total"]


def test_a_failing_mirror_never_fails_the_job(composed, tmp_path, monkeypatch):
    import wandb

    def boom(*args, **kwargs):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", boom)
    rec = run_job(composed(["method=rtn", "format=int8", f"paths.results={tmp_path}",
                            "wandb.mode=offline", *FAST]))
    assert rec["status"] == "complete"
    assert rec["wandb"]["status"] == "failed" and "W&B is down" in rec["wandb"]["error"]
    frame = read_records(tmp_path, "adhoc")
    assert frame["wandb.status"].tolist() == ["failed"]


def test_model_level_features_are_computed_once_per_model(composed, tmp_path, monkeypatch):
    import ptqscale.metrics as metrics

    calls = []
    real = metrics.measure_landscape

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "measure_landscape", counting)
    budget = ["landscape=default", "landscape.seeds=1", "landscape.levels_db=[40,30,20]",
              "landscape.max_tokens=512", "landscape.hutchinson_probes=2",
              "landscape.power_iters=2"]
    recs = [run_job(composed(["method=rtn", f"format={fmt}", f"paths.results={tmp_path}",
                              "wandb.mode=disabled", *FAST, *budget]))
            for fmt in ("int8", "int4_g128", "mxfp4")]
    assert len(calls) == 1
    kappas = {r["landscape"]["kappa"] for r in recs}
    assert len(kappas) == 1 and kappas.pop() > 0
    for r in recs:   # every job gets its own noise-equivalent prediction
        ls = r["landscape"]
        assert ls["noise_equivalent_dnll"] == pytest.approx(
            ls["kappa"] * 10 ** (-r["metrics"]["weight_sqnr_db"] / 10))
