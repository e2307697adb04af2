"""Real launches against one store: kill -9 at random moments, two launches of one study at
once, corrupt files met by a launch. Each must end with the store an uninterrupted run
gives (same keys, NLL bitwise equal) and a readable Parquet."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from runner_utils import ONE_MODEL, run_cli

from ptqscale.store import iter_records

pytestmark = pytest.mark.slow

FORMATS = ["int8", "int4_g128", "mxfp4", "nf4", "int3_g128", "mxint8"]


def grid(cache: Path) -> list[str]:
    # rtn on the 200k model with 1024 tokens: a job takes ~0.3 s once the process is up;
    # a shared token cache keeps tokenization out of every launch but the first
    return ["--multirun", "+sweep=quickstart", ONE_MODEL, "method=rtn",
            f"format={','.join(FORMATS)}", "eval.max_tokens=1024", "eval.seqlen=256",
            "progress=false", "wandb.mode=disabled", f"paths.cache={cache}"]


def store(root: Path) -> dict[str, tuple]:
    return {r["job_key"]: (r["status"], r["metrics"]["nll"], r["metrics"]["nll_fp"])
            for r in iter_records(root, "quickstart")}


def log_of(out) -> str:
    return (out.stdout or "") + (out.stderr or "")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted run: its store, its results folder and the token cache it filled."""
    base = tmp_path_factory.mktemp("reference")
    out = run_cli(grid(base / "cache"), base / "results")
    assert out.returncode == 0, log_of(out)[-3000:]
    ref = store(base / "results")
    assert len(ref) == len(FORMATS) and all(s == "complete" for s, *_ in ref.values())
    return {"store": ref, "cache": base / "cache", "results": base / "results"}


def kill_at_a_random_moment(proc: subprocess.Popen, records: Path, rng: random.Random) -> bool:
    """SIGKILL ``proc`` during start-up, or while it computes or writes a random later job;
    False when it finished first."""
    def count() -> int:
        return len(list(records.glob("*.json"))) if records.is_dir() else 0

    more = min(rng.randint(0, 2), len(FORMATS) - 1 - count())   # never after the last job
    if more <= 0:
        time.sleep(rng.uniform(1.0, 6.0))     # imports, Hydra, model load, first job
    else:
        target = count() + more
        while count() < target and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))     # somewhere in the next job or its writes
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_kill_9_at_random_moments_then_relaunch_gives_the_uninterrupted_store(tmp_path, reference):
    rng = random.Random(16)
    results, kills = tmp_path / "results", 0
    for _ in range(5):
        proc = run_cli(grid(reference["cache"]), results, wait=False)
        if not kill_at_a_random_moment(proc, results / "quickstart" / "records", rng):
            break
        kills += 1
    final = run_cli(grid(reference["cache"]), results)
    assert final.returncode == 0, log_of(final)[-3000:]
    assert kills >= 3
    assert store(results) == reference["store"]            # same keys, NLL bitwise equal
    assert len(pq.read_table(results / "quickstart" / "records.parquet")) == len(FORMATS)
    # a kill leaves its claim file unlocked; the relaunch took each over and removed it
    assert not list((results / "quickstart" / "claims").iterdir())


def test_two_launches_of_one_study_compute_each_job_once(tmp_path, reference):
    results = tmp_path / "results"
    procs = [run_cli(grid(reference["cache"]), results, wait=False) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    computed = [line.split("] ", 2)[2].split()[0] for o in outs for line in o.splitlines()
                if "[complete] quickstart/" in line]
    assert sorted(computed) == sorted(set(computed)) and len(computed) == len(FORMATS), computed
    busy = [line for o in outs for line in o.splitlines() if "[busy] quickstart/" in line]
    assert all("is being run by pid " in line for line in busy)
    assert store(results) == reference["store"]
    assert len(pq.read_table(results / "quickstart" / "records.parquet")) == len(FORMATS)


def test_corrupt_record_cache_and_parquet_are_named_moved_aside_and_recomputed(tmp_path,
                                                                                 reference):
    results = tmp_path / "results"
    shutil.copytree(reference["results"], results)
    records = sorted((results / "quickstart" / "records").glob("*.json"))
    truncated, no_status = records[0], records[1]
    truncated.write_text(truncated.read_text()[:200])
    no_status.write_text(json.dumps({"job_key": no_status.stem, "study": "quickstart"}))
    (fp_cache,) = (results / "_cache" / "fp_eval").glob("*.json")
    fp_cache.write_text("{")
    parquet = results / "quickstart" / "records.parquet"
    parquet.write_bytes(parquet.read_bytes()[:64])
    out = run_cli(grid(reference["cache"]), results)
    log = log_of(out)
    assert out.returncode == 0, log[-3000:]
    assert "Traceback" not in log
    for path in (truncated, no_status, fp_cache, parquet):
        assert any("corrupt " in line and str(path) in line for line in log.splitlines()), path
        assert len(list(path.parent.glob(f"{path.name}.corrupt-*"))) == 1, path
    assert log.count("[complete] quickstart/") == 2 and log.count("[skip] quickstart/") == 4
    assert store(results) == reference["store"]
    assert len(pq.read_table(parquet)) == len(FORMATS)
    fresh = {r["job_key"]: r for r in iter_records(results, "quickstart")}
    assert sum(not fresh[p.stem]["metrics"]["fp_cached"] for p in (truncated, no_status)) == 1
