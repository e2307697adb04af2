"""The store under faults: corrupt files are named and moved aside, claims die with their
process, and concurrent consolidation always leaves a readable Parquet."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ptqscale.store import (
    cache_get,
    cache_put,
    claim_job,
    consolidate,
    iter_records,
    read_record,
    read_records,
    record_path,
    running_claims,
    write_record,
)
from ptqscale.store.claims import claim_path


def rec(key: str, nll: float = 2.0, study: str = "s") -> dict:
    return {"job_key": key, "study": study, "status": "complete", "metrics": {"nll": nll}}


def aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


CORRUPT = {
    "truncated": b'{"job_key": "k", "study": "s", "sta',
    "empty": b"",
    "binary": b"\xff\xfe\x00garbage",
    "not_an_object": b"[1, 2]",
    "no_status": json.dumps({"job_key": "k", "study": "s"}).encode(),
}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_a_corrupt_record_is_named_moved_aside_and_reads_as_absent(tmp_path, caplog, content):
    path = record_path(tmp_path, "s", "k")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, "ptqscale"):
        assert read_record(tmp_path, "s", "k") is None
    assert not path.exists() and len(aside(path)) == 1
    assert aside(path)[0].read_bytes() == content   # kept for inspection
    (line,) = [r.getMessage() for r in caplog.records]
    assert str(path) in line and "moved to" in line and "recomputed" in line
    write_record(tmp_path, rec("k"))                # the job's new record then reads fine
    assert read_record(tmp_path, "s", "k")["status"] == "complete"


@pytest.mark.parametrize("n", [3, 80])   # the one-by-one parser and Arrow's reader
def test_readers_name_and_skip_a_corrupt_record(tmp_path, caplog, n):
    for i in range(n):
        write_record(tmp_path, rec(f"k{i:03d}", nll=float(i)))
    bad = record_path(tmp_path, "s", "k001")
    bad.write_text('{"job_key": "k001", "stu')
    with caplog.at_level(logging.WARNING, "ptqscale"):
        frame = read_records(tmp_path, "s")
        keys = [r["job_key"] for r in iter_records(tmp_path, "s")]
        consolidate(tmp_path, "s")
    assert "k001" not in set(frame["job_key"]) and len(frame) == n - 1
    assert "k001" not in keys and len(keys) == n - 1
    assert len(pq.read_table(tmp_path / "s" / "records.parquet")) == n - 1
    assert bad.exists()      # a reader leaves it where it is; the job moves it aside
    assert any(str(bad) in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_a_truncated_parquet_is_ignored_by_readers_and_rebuilt(tmp_path, caplog):
    for i in range(5):
        write_record(tmp_path, rec(f"k{i}", nll=float(i)))
    parquet = consolidate(tmp_path, "s")
    parquet.write_bytes(parquet.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, "ptqscale"):
        assert read_records(tmp_path, "s")["metrics.nll"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
        consolidate(tmp_path, "s")
    assert len(pq.read_table(parquet)) == 5 and len(aside(parquet)) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert any(str(parquet) in line and "ignored" in line for line in lines)
    assert any(str(parquet) in line and "rebuilt" in line for line in lines)


def test_a_corrupt_cache_entry_is_moved_aside_and_recomputed(tmp_path, caplog):
    cache_put(tmp_path, "fp_eval", "ab", {"nll": 1.0})
    path = tmp_path / "_cache" / "fp_eval" / "ab.json"
    with caplog.at_level(logging.WARNING, "ptqscale"):
        assert cache_get(tmp_path, "fp_eval", "ab", required=("nll", "tokens")) is None
    assert not path.exists() and len(aside(path)) == 1
    assert str(path) in caplog.records[0].getMessage()
    assert "missing required keys ['tokens']" in caplog.records[0].getMessage()
    path.write_text("{not json")
    assert cache_get(tmp_path, "fp_eval", "ab") is None and len(aside(path)) == 2


def test_a_claim_is_exclusive_and_released(tmp_path):
    with claim_job(tmp_path, "s", "k") as holder:
        assert holder is None
        assert running_claims(tmp_path, "s") == {"k": f"pid {os.getpid()}"}
        with claim_job(tmp_path, "s", "k") as other:   # flock: per open file, so this conflicts
            assert other == f"pid {os.getpid()}"
    assert not claim_path(tmp_path, "s", "k").exists() and running_claims(tmp_path, "s") == {}
    with claim_job(tmp_path, "s", "k") as holder:
        assert holder is None


HOLD = """
import sys, time
from ptqscale.store import claim_job
with claim_job(sys.argv[1], "s", "k") as holder:
    print(holder, flush=True)
    time.sleep(60)
"""


def test_a_claim_dies_with_its_process_under_kill_9(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "None"
        with claim_job(tmp_path, "s", "k") as holder:
            assert holder == f"pid {proc.pid}"
        assert running_claims(tmp_path, "s") == {"k": f"pid {proc.pid}"}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert claim_path(tmp_path, "s", "k").exists()    # left behind, but not held
    assert running_claims(tmp_path, "s") == {}
    with claim_job(tmp_path, "s", "k") as holder:
        assert holder is None


def _add_records(root: str, start: int, n: int) -> None:
    for i in range(start, start + n):
        write_record(root, rec(f"k{i:04d}", nll=float(i)))
        time.sleep(0.002)


def _consolidate(root: str, times: int) -> None:
    for _ in range(times):
        consolidate(root, "s")


def test_concurrent_consolidation_leaves_a_readable_parquet_after_every_round(tmp_path):
    ctx = mp.get_context("fork")   # the store is imported already: forks start in ms
    root, added = str(tmp_path), 0
    for _ in range(6):
        procs = [ctx.Process(target=_add_records, args=(root, added, 40))]
        procs += [ctx.Process(target=_consolidate, args=(root, 4)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * len(procs)
        added += 40
        table = pq.read_table(tmp_path / "s" / "records.parquet")   # whole after every round
        assert 0 < table.num_rows <= added
        assert len(read_records(root, "s")) == added
    consolidate(root, "s")
    assert pq.read_table(tmp_path / "s" / "records.parquet").num_rows == added
    assert not list((tmp_path / "s").glob("*.tmp")) and not list((tmp_path / "s").glob(".*.tmp"))
