"""The reader serves consolidated rows from records.parquet and re-reads only changed JSON."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from ptqscale.store import consolidate, iter_records, read_records, write_record
from ptqscale.store.records import _flatten, record_states


def rec(key: str, nll: float, status: str = "complete") -> dict:
    return {"job_key": key, "study": "s", "status": status, "metrics": {"nll": nll},
            "model": {"name": "m"}, "layers": [{"name": "a"}]}


def parsed(root) -> pd.DataFrame:
    """The reference: every JSON record parsed and flattened, sorted by key."""
    return pd.DataFrame([_flatten(r) for r in iter_records(root, "s")])


def test_reader_after_consolidation_matches_parsing_every_file(tmp_path):
    for i in range(4):
        write_record(tmp_path, rec(f"k{i}", float(i)))
    consolidate(tmp_path, "s")
    write_record(tmp_path, rec("k1", 10.0, "failed"))       # rewritten
    write_record(tmp_path, rec("k9", 9.0))                  # new
    os.remove(tmp_path / "s" / "records" / "k2.json")       # deleted
    got = read_records(tmp_path, "s", status=None)
    pd.testing.assert_frame_equal(got[sorted(got.columns)], parsed(tmp_path)[sorted(got.columns)],
                                  check_dtype=False)
    assert got["job_key"].tolist() == ["k0", "k1", "k3", "k9"]
    assert record_states(tmp_path, "s") == {"k0": "complete", "k1": "failed",
                                            "k3": "complete", "k9": "complete"}
    # consolidating again keeps the current rows and picks up the changes
    frame = pd.read_parquet(consolidate(tmp_path, "s"))
    assert frame.set_index("job_key")["metrics.nll"].to_dict() == \
        {"k0": 0.0, "k1": 10.0, "k3": 3.0, "k9": 9.0}


def test_unchanged_files_are_served_from_the_parquet(tmp_path):
    write_record(tmp_path, rec("k0", 1.0))
    consolidate(tmp_path, "s")
    path = tmp_path / "s" / "records" / "k0.json"
    stat = path.stat()
    path.write_text(path.read_text().replace('"nll": 1.0', '"nll": 2.0'))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))   # same mtime: looks unchanged
    assert read_records(tmp_path, "s")["metrics.nll"].tolist() == [1.0]
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert read_records(tmp_path, "s")["metrics.nll"].tolist() == [2.0]


def test_a_parquet_without_source_mtimes_is_not_trusted(tmp_path):
    write_record(tmp_path, rec("k0", 1.0))
    pd.DataFrame({"job_key": ["k0"], "status": ["complete"], "metrics.nll": [5.0]}).to_parquet(
        tmp_path / "s" / "records.parquet")
    assert read_records(tmp_path, "s")["metrics.nll"].tolist() == [1.0]


@pytest.mark.parametrize("study", [None, "s"])
def test_reader_without_records(tmp_path, study):
    assert read_records(tmp_path, study).empty and record_states(tmp_path, "s") == {}


def varied(i: int) -> dict:
    """Records unlike each other: failures, missing and extra fields, lists, nulls."""
    r = rec(f"k{i:03d}", 1.0 + i / 7, "failed" if i % 5 == 0 else "complete")
    r["method"] = {"name": "rtn", "targets": {"include": ["*"] * (i % 3), "exclude": []},
                   "group": None if i % 4 else 128}
    r["created_at"] = f"2026-01-{1 + i % 28:02d}T00:00:00+00:00"
    if i % 5 == 0:
        r["error"] = {"type": "RuntimeError", "message": "x"}
    if i % 2:
        r["landscape"] = {"kappa": i * 0.5, "dnll_at_20db": [0.1, 0.2]}
    return r


@pytest.mark.parametrize("extra", [{}, {"metrics": {"nll": float("nan")}}], ids=["arrow", "nan"])
def test_the_bulk_parser_gives_the_per_file_frame(tmp_path, monkeypatch, extra):
    from ptqscale.store import records

    for i in range(100):
        write_record(tmp_path, {**varied(i), **(extra if i == 50 else {})})
    used = []
    arrow = records._parse_arrow
    monkeypatch.setattr(records, "_parse_arrow", lambda texts: used.append(1) or arrow(texts))
    bulk = read_records(tmp_path, "s", status=None)
    if not extra:    # NaN is not JSON: Arrow refuses the file and the per-file parser reads it
        pd.testing.assert_frame_equal(arrow(records._read_all(
            tmp_path / "s" / "records", [f"k{i:03d}" for i in range(100)])).drop(columns="_key"),
            bulk.drop(columns=[]), check_like=True, check_dtype=False)
    assert used
    monkeypatch.setattr(records, "_ARROW_MIN", 10**9)          # per-file parsing only
    one_by_one = read_records(tmp_path, "s", status=None)
    assert sorted(bulk.columns) == sorted(one_by_one.columns)
    pd.testing.assert_frame_equal(bulk[sorted(bulk.columns)],
                                  one_by_one[sorted(bulk.columns)], check_dtype=False)
    assert bulk["method.targets.include"].iloc[2] == '["*", "*"]'
