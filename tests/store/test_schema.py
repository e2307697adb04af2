"""The record schema as code: docs agree with it, the writer stamps it, readers upgrade to it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ptqscale.files import atomic_write_json
from ptqscale.formats import EXAMPLES, get_format
from ptqscale.store import (
    RECORD_SCHEMA_VERSION,
    iter_records,
    job_config,
    read_record,
    read_records,
    record_path,
    upgrade,
    write_record,
)
from ptqscale.store.schema import FormatInfo, RecordSchemaError, field_paths, record_problems

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "records.md"
# The studies committed before schema 2 (a study run in this checkout, such as the README's
# quickstart, writes version-2 records beside them)
V1_STUDIES = ("awq", "blockft", "crossquant", "family_scan")
COMMITTED = sorted(p for s in V1_STUDIES for p in (ROOT / "results" / s / "records").glob("*.json"))
COPIES = ("config.format", "config.method.format", "method.format", "quantization.format")


def documented_fields() -> set[str]:
    """The backticked names in the first column of the field table of docs/records.md."""
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_every_schema_field_is_documented_and_no_documented_field_is_stale():
    schema = set(field_paths())
    documented = documented_fields()
    open_prefixes = tuple(p[:-1] for p in schema if p.endswith(".*"))
    undocumented = sorted(schema - documented)
    stale = sorted(d for d in documented - schema if not d.startswith(open_prefixes))
    assert not undocumented, f"docs/records.md lacks {undocumented} (store/schema.py Record)"
    assert not stale, f"docs/records.md documents {stale}, which store/schema.py Record lacks"


def test_the_doc_names_the_current_version():
    assert f"schema version {RECORD_SCHEMA_VERSION}," in DOC.read_text().splitlines()[0]


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_format_block_is_what_a_format_describes(name):
    describe = get_format(name).describe()
    assert set(describe) == set(FormatInfo.__annotations__)
    assert record_problems({"job_key": "k", "study": "s", "status": "complete",
                            "format": describe}) == []


def _get(record: dict, path: str):
    for part in path.split("."):
        if not isinstance(record, dict) or part not in record:
            return None
        record = record[part]
    return record


def test_committed_records_upgrade_to_the_schema_with_one_format_name():
    assert len(COMMITTED) > 500
    for path in COMMITTED:
        old = json.loads(path.read_text())
        assert old["schema_version"] == 1 and all(_get(old, c) for c in COPIES)
        new = upgrade(old, str(path))
        assert record_problems(new) == [], path
        assert new["schema_version"] == RECORD_SCHEMA_VERSION
        assert [c for c in COPIES if _get(new, c) is not None] == [], path
        assert new["format"]["name"] == old["method"]["format"]
        # the config a job was composed from comes back whole (its key: test_golden_keys)
        assert job_config(new) == job_config(old) == old["config"], path
        assert {k: v for k, v in new.items() if k not in ("method", "quantization", "config",
                                                          "schema_version")} == \
               {k: v for k, v in old.items() if k not in ("method", "quantization", "config",
                                                          "schema_version")}


def _v1(key: str, version: int = 1) -> dict:
    """A record as a version-1 writer left it (five copies of the format name)."""
    return {"schema_version": version, "job_key": key, "study": "s", "status": "complete",
            "format": {"name": "int4_g128", "bits_per_weight": 4.125},
            "method": {"name": "rtn", "format": "int4_g128"},
            "quantization": {"method": "rtn", "format": "int4_g128", "seconds": 0.1},
            "config": {"format": "int4_g128", "method": {"name": "rtn", "format": "int4_g128"}},
            "metrics": {"nll": 2.0}}


def test_readers_upgrade_version_1_records_on_disk_without_rewriting_them(tmp_path):
    path = atomic_write_json(record_path(tmp_path, "s", "k1"), _v1("k1"))
    before = path.read_bytes()
    for rec in (read_record(tmp_path, "s", "k1"), next(iter_records(tmp_path, "s"))):
        assert rec["schema_version"] == RECORD_SCHEMA_VERSION
        assert rec["method"] == {"name": "rtn"} and "format" not in rec["quantization"]
        assert rec["config"] == {"method": {"name": "rtn"}}
        assert job_config(rec) == _v1("k1")["config"]
    frame = read_records(tmp_path, "s")
    assert frame["format.name"].tolist() == ["int4_g128"]
    assert path.read_bytes() == before


def test_a_newer_layout_is_a_clear_error_naming_the_file(tmp_path):
    path = atomic_write_json(record_path(tmp_path, "s", "k9"), _v1("k9", RECORD_SCHEMA_VERSION + 1))
    newer = re.escape(f"{path}: schema_version={RECORD_SCHEMA_VERSION + 1} is newer than "
                      "this ptqscale reads")
    with pytest.raises(RecordSchemaError, match=newer):
        read_record(tmp_path, "s", "k9")
    with pytest.raises(RecordSchemaError, match=newer):
        list(iter_records(tmp_path))
    with pytest.raises(RecordSchemaError, match=newer):
        read_records(tmp_path, "s")


def test_the_writer_stamps_the_version_and_stores_the_format_name_once(tmp_path):
    new = upgrade(_v1("k1"))
    path = write_record(tmp_path, {**new, "schema_version": 1})
    assert json.loads(path.read_text())["schema_version"] == RECORD_SCHEMA_VERSION
    with pytest.raises(ValueError, match=r"\['colour'\] are not in the record schema"):
        write_record(tmp_path, {**new, "colour": "red"})
    with pytest.raises(ValueError, match="method.format: a record stores the format name once"):
        write_record(tmp_path, {**new, "method": {"name": "rtn", "format": "int4_g128"}})


def test_job_config_of_an_invalid_record_says_it_has_none():
    with pytest.raises(ValueError, match="'invalid-1' .status 'invalid'. holds no job config"):
        job_config({"job_key": "invalid-1", "study": "s", "status": "invalid",
                    "overrides": ["format=int9"]})


def test_record_problems_names_each_departure():
    rec = {"job_key": "k", "study": "s", "status": "done", "model": {"name": 3},
           "metrics": {"nll": "2.0", "tokens": 5, "ok": True}, "layers": {}, "extra": 1}
    assert sorted(record_problems(rec)) == sorted([
        "status: 'done' is not one of ['complete', 'failed', 'invalid']",
        "model.family: missing", "model.size: missing", "model.path: missing",
        "model.dtype: missing", "model.name: expected str, got int",
        "metrics.nll: '2.0' is none of float | int | bool | None",
        "layers: expected a list, got dict", "extra: not in the schema"])
