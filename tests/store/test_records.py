"""The store: atomic writes, one file per job, Parquet consolidation, a tidy reader."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ptqscale.store import (
    RECORD_SCHEMA_VERSION,
    atomic_write_json,
    cache_get,
    cache_put,
    consolidate,
    read_record,
    read_records,
    record_path,
    write_record,
)


def rec(key: str, status: str = "complete", nll: float = 2.0, study: str = "s") -> dict:
    return {"job_key": key, "study": study, "status": status,
            "model": {"name": "m"}, "metrics": {"nll": nll}, "layers": [{"name": "a"}],
            "config": {"x": 1}}


def test_round_trip_and_overwrite(tmp_path):
    write_record(tmp_path, rec("k1", "failed"))
    assert read_record(tmp_path, "s", "k1")["status"] == "failed"
    write_record(tmp_path, rec("k1", "complete", 1.5))
    got = read_record(tmp_path, "s", "k1")
    assert got["status"] == "complete" and got["metrics"]["nll"] == 1.5
    assert got["schema_version"] == RECORD_SCHEMA_VERSION
    assert read_record(tmp_path, "s", "missing") is None
    assert [p.name for p in record_path(tmp_path, "s", "k1").parent.iterdir()] == ["k1.json"]


def test_a_record_needs_key_study_status(tmp_path):
    with pytest.raises(ValueError, match="job_key"):
        write_record(tmp_path, {"study": "s", "status": "complete"})


def test_a_crash_mid_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()})   # fails while serialising
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_reader_flattens_and_filters_by_status(tmp_path):
    write_record(tmp_path, rec("a", nll=2.0))
    write_record(tmp_path, rec("b", "failed"))
    write_record(tmp_path, rec("c", nll=3.0, study="other"))
    df = read_records(tmp_path, "s")
    assert df["metrics.nll"].tolist() == [2.0] and df["model.name"].tolist() == ["m"]
    assert "layers" not in df.columns and "config.x" not in df.columns
    assert len(read_records(tmp_path, "s", status=None)) == 2
    assert sorted(read_records(tmp_path)["study"]) == ["other", "s"]
    assert read_records(tmp_path / "nothing_here").empty


def test_consolidate_to_parquet(tmp_path):
    for i in range(5):
        write_record(tmp_path, rec(f"k{i}", nll=float(i)))
    path = consolidate(tmp_path, "s")
    frame = pd.read_parquet(path)
    assert sorted(frame["metrics.nll"]) == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("n", [4, 70])  # one-by-one parser and Arrow's (>= 64 records)
def test_consolidate_fields_whose_type_differs_and_lists_of_structs(tmp_path, n):
    # seen in the blockft study: method.offload is a bool for GPTQ, "auto" for fine-tuning;
    # crossquant records hold lists of dicts with lists inside
    for i in range(n):
        r = rec(f"k{i:03d}", nll=float(i))
        r["method"] = {"offload": "auto" if i % 2 else False}
        r["metrics"]["grid"] = [{"alpha": 0.5, "nll": [1.0, float(i)]}]
        write_record(tmp_path, r)
    frame = pd.read_parquet(consolidate(tmp_path, "s"))
    assert sorted(set(frame["method.offload"])) == ["auto", "false"]
    assert json.loads(frame["metrics.grid"].iloc[-1]) == [{"alpha": 0.5, "nll": [1.0, n - 1.0]}]


def test_cache(tmp_path):
    assert cache_get(tmp_path, "fp_eval", "k") is None
    cache_put(tmp_path, "fp_eval", "k", {"nll": 1.0})
    assert cache_get(tmp_path, "fp_eval", "k") == {"nll": 1.0}
    assert read_records(tmp_path).empty   # caches are not studies
