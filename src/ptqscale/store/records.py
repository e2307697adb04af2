"""Record I/O: atomic JSON writes, a model-level cache, Parquet consolidation, a reader."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from ptqscale.files import (
    atomic_write,
    atomic_write_json,
    json_problem,
    locked,
    log,
    quarantine,
    read_json,
)
from ptqscale.store.schema import (
    RECORD_SCHEMA_VERSION,
    REQUIRED,
    check_version,
    check_written,
    upgrade,
)

# Nested fields kept out of the tidy frame: they are per-layer lists or whole configs,
# available from the JSON records themselves.
_WIDE_FIELDS = ("layers", "config", "error")
# Column of records.parquet: the mtime (ns) of the JSON file each row was read from, so
# that a reader knows which rows are still current.
_MTIME = "_source_mtime_ns"
# From this many files on, records are parsed by Arrow's JSON reader.
_ARROW_MIN = 64
# What a reader says about a corrupt record: it skips it and leaves it where it is (the
# job itself moves it aside when it meets it, then recomputes it).
_SKIPPED = "skipped (re-launch its study to recompute it)"


# A study is one folder under the results root: a plain name, never a path.
_STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def check_study(study: str) -> str:
    """``study`` if it is a valid study name, else ConfigError saying what is allowed.

    >>> check_study("../x")
    Traceback (most recent call last):
    ...
    ptqscale.errors.ConfigError: study='../x' is not a study name; allowed: letters, digits, '_', '-', '.' (not first)
    """
    if not isinstance(study, str) or not _STUDY_NAME.fullmatch(study):
        # imported here: the analysis package loads the store and nothing else of ptqscale
        from ptqscale.errors import ConfigError

        raise ConfigError(f"study={study!r} is not a study name; allowed: letters, digits, "
                          "'_', '-', '.' (not first)")
    return study


def record_path(root: str | os.PathLike, study: str, job_key: str) -> Path:
    return Path(root) / check_study(study) / "records" / f"{job_key}.json"


def write_record(root: str | os.PathLike, record: dict) -> Path:
    """Write one job record in the current layout (store/schema.py ``Record``: it needs
    ``job_key``, ``study`` and ``status``, and holds no field the schema lacks)."""
    check_written(record)
    record = {**record, "schema_version": RECORD_SCHEMA_VERSION}
    return atomic_write_json(record_path(root, record["study"], record["job_key"]), record)


def read_record(root: str | os.PathLike, study: str, job_key: str) -> dict | None:
    """The record of one job in the current layout, or None when the store has none.

    A corrupt record (not JSON, or without ``job_key``/``study``/``status``) is moved
    aside with one log line naming it, and reads as absent: the job is recomputed. One of
    a newer layout than this ptqscale reads raises RecordSchemaError.
    """
    path = record_path(root, study, job_key)
    record = read_json(path, REQUIRED, "record", "its job will be recomputed")
    return None if record is None else upgrade(record, str(path))


def iter_records(root: str | os.PathLike, study: str | None = None) -> Iterator[dict]:
    """Every readable record under ``root`` (one study, or all), in a stable order, each in
    the current layout.

    A corrupt record is named in one log line and skipped; one of a newer layout than this
    ptqscale reads raises RecordSchemaError.
    """
    for sdir in _study_dirs(root, study):
        for key in sorted(_listing(sdir)):
            path = sdir / "records" / f"{key}.json"
            try:
                text = path.read_bytes()
            except FileNotFoundError:   # deleted since the scan
                continue
            record = _checked(text, path)
            if record is not None:
                yield upgrade(record, str(path))


def _checked(text: bytes, path: Path) -> dict | None:
    """The record ``text`` of ``path``, or None (with one log line) when it is corrupt."""
    record, reason = json_problem(text, REQUIRED)
    if reason is not None:
        log.warning("corrupt record %s (%s): %s", path, reason, _SKIPPED)
    return record


def read_records(root: str | os.PathLike, study: str | None = None,
                 status: str | None = "complete") -> pd.DataFrame:
    """Records as a tidy DataFrame: one row per job, nested fields as dotted columns.

    ``status=None`` keeps failed jobs too. Where a study was consolidated, rows come from
    ``records.parquet`` as long as their JSON file is unchanged; only new or rewritten
    records are parsed. The JSON files stay the truth: a deleted file drops its row.

    Rows hold each record's fields as stored, whatever its ``schema_version``: the
    columns every layout shares (``format.name`` for the format) read the same, and
    version-1 rows also carry the redundant ``method.format``/``quantization.format``
    (left in place, so that what was read, and a fingerprint of it, does not change).
    A record of a newer layout than this ptqscale reads raises RecordSchemaError.
    """
    frames = [f for f in (_study_frame(d) for d in _study_dirs(root, study)) if not f.empty]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    df = df.drop(columns=[_MTIME], errors="ignore")
    _check_versions(df, root)
    if status is not None and not df.empty:
        df = df[df["status"] == status].reset_index(drop=True)
    return df


def _check_versions(df: pd.DataFrame, root: str | os.PathLike) -> None:
    """RecordSchemaError naming the first record whose layout this ptqscale cannot read."""
    if df.empty or "schema_version" not in df:
        return
    versions = pd.to_numeric(df["schema_version"], errors="coerce").fillna(1)
    bad = df[(versions > RECORD_SCHEMA_VERSION) | (versions < 1)]
    if not bad.empty:
        row = bad.iloc[0]
        check_version(int(versions[bad.index[0]]),
                      str(record_path(root, row["study"], row["job_key"])))


def record_states(root: str | os.PathLike, study: str) -> dict[str, str]:
    """``job_key -> status`` of every record of a study (what ``ptqscale-plan`` needs).

    >>> import tempfile
    >>> record_states(tempfile.mkdtemp(), "demo")
    {}
    """
    frame = _study_frame(Path(root) / study, columns=["job_key", "status"])
    return dict(zip(frame["job_key"], frame["status"])) if not frame.empty else {}


def consolidate(root: str | os.PathLike, study: str) -> Path:
    """Write ``<root>/<study>/records.parquet`` from the study's JSON records (all statuses).

    Incremental: rows of the previous Parquet whose JSON file did not change are kept, so
    re-consolidating after a few more jobs parses only those. Safe when several processes
    consolidate at once (two launches of one study): they take turns on a lock file, and
    each writes a temporary file of its own, so the Parquet is whole at every moment. A
    Parquet that cannot be read is moved aside (one log line) and rebuilt.
    """
    sdir = Path(root) / check_study(study)
    path = sdir / "records.parquet"
    with locked(sdir / ".records.parquet.lock"):
        reason = _unreadable(path)
        if reason is not None:
            quarantine(path, reason, "consolidated records", "rebuilt from the JSON records")
        df = _text_where_mixed(_study_frame(sdir))
        atomic_write(path, lambda f: df.to_parquet(f, index=False), binary=True)
    return path


def _unreadable(path: Path) -> str | None:
    """Why the Parquet file ``path`` cannot be opened (None: it can, or it is absent).

    Opening reads the footer, which a truncated or overwritten file lacks; the rows are
    read (once) by ``_consolidated``, which ignores a file it cannot read.
    """
    if not path.is_file():
        return None
    try:
        pq.ParquetFile(path)   # opening reads the footer
    except (pa.ArrowException, OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _text_where_mixed(df: pd.DataFrame) -> pd.DataFrame:
    """Columns whose values differ in type between records (``method.offload``: a bool for
    GPTQ, a string for block fine-tuning) hold JSON text, as Parquet needs one type."""
    for col in df.select_dtypes(include="object").columns:
        # infer_dtype is one C pass: the common all-string column costs no Python loop
        if pd.api.types.infer_dtype(df[col], skipna=True) in ("mixed", "mixed-integer"):
            df[col] = [v if v is None or v != v or isinstance(v, str) else json.dumps(v)
                       for v in df[col]]
    return df


def _study_dirs(root: str | os.PathLike, study: str | None) -> list[Path]:
    root = Path(root)
    if study is not None:
        return [root / check_study(study)]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def _listing(sdir: Path) -> dict[str, int]:
    """``job_key -> mtime_ns`` of the study's record files, from one directory scan."""
    try:
        with os.scandir(sdir / "records") as it:
            return {e.name[:-5]: e.stat().st_mtime_ns for e in it
                    if e.name.endswith(".json") and not e.name.startswith(".")}
    except FileNotFoundError:
        return {}


def _study_frame(sdir: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A study's records sorted by key, each row with its file's mtime in ``_MTIME``."""
    listing = _listing(sdir)
    kept = _consolidated(sdir, listing, columns)
    todo = sorted(set(listing) - set(kept["job_key"]))
    new = _parse(sdir / "records", todo)
    if new.empty:
        return kept
    if columns is not None:
        new = new.reindex(columns=[*columns, "_key"])
    new[_MTIME] = [listing[k] for k in new.pop("_key")]
    df = pd.concat([kept, new], ignore_index=True) if len(kept) else new
    return df.sort_values("job_key", ignore_index=True)


def _parse(rdir: Path, keys: list[str]) -> pd.DataFrame:
    """Flattened records ``keys`` of ``rdir`` (file names in the column ``_key``).

    Many files at once are parsed by Arrow's multi-threaded JSON reader (a 10^5-record
    study in seconds, not minutes); where it cannot (non-standard JSON such as NaN, a
    field whose type differs between records, a corrupt file), one by one with
    :func:`_flatten`, which names and skips corrupt files.
    """
    texts = _read_all(rdir, keys)
    if len(texts) >= _ARROW_MIN:
        try:
            return _parse_arrow(texts)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
    records = {key: _checked(text, rdir / f"{key}.json") for key, text in texts.items()}
    rows = [{**_flatten(r), "_key": key} for key, r in records.items() if r is not None]
    return pd.DataFrame(rows)


def _read_all(rdir: Path, keys: list[str]) -> dict[str, bytes]:
    def read(key: str) -> bytes | None:
        try:
            return (rdir / f"{key}.json").read_bytes()
        except FileNotFoundError:   # deleted since the scan
            return None

    def read_chunk(chunk: list[str]) -> list[tuple[str, bytes | None]]:
        return [(key, read(key)) for key in chunk]

    chunks = [keys[i:i + 4096] for i in range(0, len(keys), 4096)]
    with ThreadPoolExecutor(4) as pool:   # reads release the GIL (helps on network filesystems)
        pairs = [pair for part in pool.map(read_chunk, chunks) for pair in part]
    return {k: t for k, t in pairs if t is not None}


def _parse_arrow(texts: dict[str, bytes]) -> pd.DataFrame:
    """Arrow's reader on the concatenated files; the same frame as ``_flatten`` gives."""
    options = pj.ParseOptions(newlines_in_values=True,   # records are indented JSON
                              explicit_schema=pa.schema([("created_at", pa.string())]))
    table = pj.read_json(io.BytesIO(b"\n".join(texts.values())), parse_options=options,
                         read_options=pj.ReadOptions(block_size=1 << 20))
    if table.num_rows != len(texts):
        raise pa.ArrowInvalid("record count differs from file count")
    if any(c not in table.column_names or table[c].null_count for c in REQUIRED):
        raise pa.ArrowInvalid("a record lacks a required field")   # the slow path names it
    table = table.drop_columns([c for c in _WIDE_FIELDS if c in table.column_names])
    while any(pa.types.is_struct(f.type) for f in table.schema):
        table = table.flatten()       # nested fields become dotted columns
    if any(pa.types.is_timestamp(f.type) for f in table.schema):
        raise pa.ArrowInvalid("a string field was read as a timestamp")
    df = table.to_pandas()
    for field in table.schema:       # lists as JSON text, as _flatten writes them
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            df[field.name] = [None if v is None else json.dumps(_plain_list(v))
                              for v in df[field.name]]
    df["_key"] = list(texts)
    return df


def _plain_list(value: Any) -> Any:
    """Arrow's list values (numpy arrays, also inside lists of structs) as plain Python."""
    value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, dict):
        return {k: _plain_list(v) for k, v in value.items()}
    return [_plain_list(v) for v in value] if isinstance(value, list) else value


def _consolidated(sdir: Path, listing: dict[str, int], columns: list[str] | None) -> pd.DataFrame:
    """The rows of ``records.parquet`` whose JSON file is still there, unchanged."""
    path = sdir / "records.parquet"
    none = pd.DataFrame({"job_key": pd.Series(dtype=str)})
    if not listing or not path.is_file():
        return none
    try:   # one open file: a consolidation that replaces it meanwhile cannot mix two files
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if _MTIME not in names or "job_key" not in names:   # an older layout: parse every JSON
            return none
        if columns is not None:
            columns = [c for c in names if c in {*columns, "job_key", _MTIME}]
        df = parquet.read(columns=columns).to_pandas()
    except (pa.ArrowException, OSError, ValueError) as e:
        log.warning("corrupt consolidated records %s (%s: %s): ignored, reading the JSON "
                    "records (the next consolidation rebuilds it)", path, type(e).__name__, e)
        return none
    # python ints: nanosecond mtimes do not survive a round trip through float64
    current = np.array([listing.get(k, -1) for k in df["job_key"]], dtype=np.int64)
    return df[current == df[_MTIME].to_numpy(dtype=np.int64)].reset_index(drop=True)


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


def cache_get(root: str | os.PathLike, kind: str, key: str,
              required: tuple[str, ...] = ()) -> dict | None:
    """A cached model-level result (e.g. the full-precision NLL of a model), or None.

    A corrupt entry (not a JSON object, or without the ``required`` keys) is moved aside
    with one log line naming it, and reads as absent, so that it is recomputed.
    """
    return read_json(Path(root) / "_cache" / kind / f"{key}.json", required,
                     f"{kind} cache entry", "it will be recomputed")


def cache_put(root: str | os.PathLike, kind: str, key: str, value: dict) -> Path:
    """Store a model-level result atomically (see :func:`cache_get`)."""
    return atomic_write_json(Path(root) / "_cache" / kind / f"{key}.json", value)
