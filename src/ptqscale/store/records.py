"""Record I/O: atomic JSON writes, a model-level cache, Parquet consolidation, a reader."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

# Bumped whenever the layout of a record changes; readers may branch on it.
RECORD_SCHEMA_VERSION = 1

# Nested fields kept out of the tidy frame: they are per-layer lists or whole configs,
# available from the JSON records themselves.
_WIDE_FIELDS = ("layers", "config", "error")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(o: Any) -> Any:
    # numpy scalars and paths appear in metrics and configs; store them as plain JSON.
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def record_path(root: str | os.PathLike, study: str, job_key: str) -> Path:
    return Path(root) / study / "records" / f"{job_key}.json"


def write_record(root: str | os.PathLike, record: dict) -> Path:
    """Write one job record (needs ``job_key``, ``study`` and ``status``)."""
    for field in ("job_key", "study", "status"):
        if field not in record:
            raise ValueError(f"a record needs the field {field!r}")
    record = {"schema_version": RECORD_SCHEMA_VERSION, **record}
    return atomic_write_json(record_path(root, record["study"], record["job_key"]), record)


def read_record(root: str | os.PathLike, study: str, job_key: str) -> dict | None:
    """The record of one job, or None when the store has none."""
    path = record_path(root, study, job_key)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def iter_records(root: str | os.PathLike, study: str | None = None) -> Iterator[dict]:
    """Every record under ``root`` (one study, or all), in a stable order."""
    root = Path(root)
    if study is not None:
        studies = [root / study]
    elif root.is_dir():
        studies = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    else:
        studies = []
    for sdir in studies:
        rdir = sdir / "records"
        if not rdir.is_dir():
            continue
        with os.scandir(rdir) as it:
            names = sorted(e.name for e in it if e.name.endswith(".json") and not e.name.startswith("."))
        for name in names:
            yield json.loads((rdir / name).read_text())


def read_records(root: str | os.PathLike, study: str | None = None,
                 status: str | None = "complete") -> pd.DataFrame:
    """Records as a tidy DataFrame: one row per job, nested fields as dotted columns.

    ``status=None`` keeps failed jobs too.
    """
    rows = [_flatten(r) for r in iter_records(root, study)]
    df = pd.DataFrame(rows)
    if status is not None and not df.empty:
        df = df[df["status"] == status].reset_index(drop=True)
    return df


def _flatten(record: dict) -> dict:
    """Nested dicts become dotted columns; lists (rare outside the wide fields) become JSON."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: dict) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v

    walk("", {k: v for k, v in record.items() if k not in _WIDE_FIELDS})
    return out


def consolidate(root: str | os.PathLike, study: str) -> Path:
    """Write ``<root>/<study>/records.parquet`` from the study's JSON records (all statuses)."""
    df = read_records(root, study, status=None)
    path = Path(root) / study / "records.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def cache_get(root: str | os.PathLike, kind: str, key: str) -> dict | None:
    """A cached model-level result (e.g. the full-precision NLL of a model), or None."""
    path = Path(root) / "_cache" / kind / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def cache_put(root: str | os.PathLike, kind: str, key: str, value: dict) -> Path:
    return atomic_write_json(Path(root) / "_cache" / kind / f"{key}.json", value)
