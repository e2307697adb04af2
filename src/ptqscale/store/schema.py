"""The record schema as code: the layout of a job record, its version and its upgrades.

``Record`` (a TypedDict) is the one description of a record: the writer
(:func:`ptqscale.store.write_record`) stamps ``RECORD_SCHEMA_VERSION`` and refuses a
top-level field that ``Record`` does not declare; every reader passes what it reads
through :func:`upgrade` (older layouts are converted, a newer one is a clear error);
docs/records.md documents each of :func:`field_paths` (tests/store/test_schema.py checks
both ways). Open mappings (``metrics``, ``quantization``, ``method`` ...) hold what their
producer reports; their documented entries are examples, not a closed list.

Versions:

1. the first layout; the format name was stored five times (``config.format``,
   ``config.method.format``, ``method.format``, ``format.name``, ``quantization.format``).
2. the format name is stored once, in ``format.name`` (the format block describes the parsed
   format); :func:`job_config` puts it back where the job's config had it.

Changing the layout: edit the TypedDicts, bump ``RECORD_SCHEMA_VERSION``, add the step from
the previous layout to ``_UPGRADES`` and update docs/records.md.

>>> old = {"schema_version": 1, "job_key": "k", "study": "s", "status": "complete",
...        "format": {"name": "int4"}, "method": {"name": "rtn", "format": "int4"},
...        "config": {"format": "int4", "method": {"name": "rtn", "format": "int4"}}}
>>> new = upgrade(old)
>>> new["schema_version"], new["method"], new["config"]
(2, {'name': 'rtn'}, {'method': {'name': 'rtn'}})
>>> job_config(new) == old["config"]
True
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import (
    Any,
    Literal,
    TypedDict,
    Union,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

RECORD_SCHEMA_VERSION = 2


class RecordSchemaError(ValueError):
    """A stored record whose layout this ptqscale cannot read (a newer ``schema_version``).

    Defined here, not in ptqscale.errors: the analysis package loads the store and nothing
    else of ptqscale.
    """

Status = Literal["complete", "failed", "invalid"]
Scalar = float | int | bool | str | None


class _ModelRequired(TypedDict):
    name: str
    family: str
    size: str
    path: str
    dtype: str


class ModelInfo(_ModelRequired, total=False):
    revision: str | None   # written since 2026-12-05; before, in config.model.revision only


class DataInfo(TypedDict):
    name: str
    split: str


class IdentityInfo(TypedDict, total=False):
    model: str
    data: str
    calib: str
    keyed_by_files: list[str]


class FormatInfo(TypedDict):
    """``Format.describe()``: the one place a record names its format."""

    name: str
    family: str
    element: str
    element_bits: int
    block_size: int | None
    granularity: str
    scale_format: str
    scale_bits: int
    zero_point: bool
    symmetric: bool
    bits_per_weight: float
    element_max: float | None
    scale_rule: str


class ParamsInfo(TypedDict):
    total: int
    embedding: int
    head: int
    blocks: int
    quantizable: int


class _WandbRequired(TypedDict):
    status: str


class WandbInfo(_WandbRequired, total=False):
    mode: str
    run_id: str
    project: str
    dir: str
    error: str
    fallback: str
    uploaded_from: str
    upload_s: float


class _ErrorRequired(TypedDict):
    type: str
    message: str


class ErrorInfo(_ErrorRequired, total=False):
    traceback: str


class _RecordRequired(TypedDict):
    job_key: str
    study: str
    status: Status


class Record(_RecordRequired, total=False):
    """One job's record (complete, failed or invalid; an invalid one has only a few fields)."""

    schema_version: int
    protocol_version: int
    name: str
    created_at: str
    model: ModelInfo
    data: DataInfo
    identity: IdentityInfo
    eval: Mapping[str, Any]            # the EvalConfig fields
    method: Mapping[str, Any]          # the method's config less its format
    format: FormatInfo
    config: Mapping[str, Any]          # the resolved job config less the format name
    params: ParamsInfo
    metrics: Mapping[str, float | int | bool | None]   # open: metrics are registered
    metric_info: Mapping[str, Mapping[str, Any]]       # per metric: version, direction, needs
    quantization: Mapping[str, Any]    # what the method reports
    landscape: Mapping[str, Scalar]
    layers: list[Mapping[str, Any]]
    timings: Mapping[str, float]
    env: Mapping[str, str | None]
    wandb: WandbInfo
    error: ErrorInfo
    overrides: list[str]               # invalid grid points: the job's Hydra overrides


# What every record holds (a file without them is corrupt), in declaration order.
REQUIRED = tuple(_RecordRequired.__annotations__)


# ---- the format name, stored once -------------------------------------------------------

def stored_config(config: Mapping[str, Any]) -> dict:
    """A job's resolved config as a record stores it: without the format name (``format``
    and ``method.format``), which ``format.name`` holds."""
    out = {k: v for k, v in config.items() if k != "format"}
    if isinstance(out.get("method"), Mapping):
        out["method"] = stored_method(out["method"])
    return out


def stored_method(method: Mapping[str, Any]) -> dict:
    """A method's settings as a record stores them: without the format name."""
    return {k: v for k, v in method.items() if k != "format"}


def job_config(record: Mapping[str, Any]) -> dict:
    """The config a record's job was composed from: ``config`` with the format name put back
    at ``format`` and ``method.format`` (what a job key and a re-run need).

    Accepts every layout (older ones are upgraded first). The root ``format`` comes back as
    the format the method used: where they differed (method ``none`` ignores the sweep's
    format axis), the root value changed nothing, neither result nor key.
    """
    record = upgrade(dict(record))
    if "config" not in record or "format" not in record:
        raise ValueError(f"record {record.get('job_key')!r} (status {record.get('status')!r}) "
                         "holds no job config: only complete and failed records do")
    config = dict(record["config"])
    name = record["format"]["name"]
    config["format"] = name
    config["method"] = {**config["method"], "format": name}
    return config


# ---- versions -----------------------------------------------------------------------------

def _v1_to_v2(record: dict) -> dict:
    """Drop the four copies of the format name that ``format.name`` makes redundant."""
    out = dict(record)
    if isinstance(out.get("method"), Mapping):
        out["method"] = stored_method(out["method"])
    if isinstance(out.get("quantization"), Mapping):
        out["quantization"] = {k: v for k, v in out["quantization"].items() if k != "format"}
    if isinstance(out.get("config"), Mapping):
        out["config"] = stored_config(out["config"])
    return out


# _UPGRADES[v] turns a layout-v record into a layout-(v + 1) one
_UPGRADES: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2}


def check_version(version: Any, where: str) -> int:
    """``version`` if this ptqscale can read it (absent: 1, the first layout), else
    RecordSchemaError naming ``where``."""
    version = 1 if version is None else version
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RecordSchemaError(f"{where}: schema_version={version!r} is not a record layout "
                                f"version (a positive integer)")
    if version > RECORD_SCHEMA_VERSION:
        raise RecordSchemaError(
            f"{where}: schema_version={version} is newer than this ptqscale reads "
            f"(1..{RECORD_SCHEMA_VERSION}); a newer ptqscale wrote it: upgrade ptqscale")
    return version


def upgrade(record: dict, where: str = "record") -> dict:
    """``record`` in the current layout (a new dict where it was older; the input is kept).

    >>> upgrade({"job_key": "k", "study": "s", "status": "failed"})["schema_version"]
    2
    >>> upgrade({"job_key": "k", "study": "s", "status": "failed", "schema_version": 9})
    Traceback (most recent call last):
    ...
    ptqscale.store.schema.RecordSchemaError: record: schema_version=9 is newer than this ptqscale reads (1..2); a newer ptqscale wrote it: upgrade ptqscale
    """
    version = check_version(record.get("schema_version"), where)
    for v in range(version, RECORD_SCHEMA_VERSION):
        record = _UPGRADES[v](record)
    if version != RECORD_SCHEMA_VERSION:
        record = {**record, "schema_version": RECORD_SCHEMA_VERSION}
    return record


def check_written(record: Mapping[str, Any]) -> None:
    """What the writer checks (cheap, every record): the required fields, and no top-level
    field the schema does not declare. ValueError naming the field."""
    for field in REQUIRED:
        if field not in record:
            raise ValueError(f"a record needs the field {field!r}")
    unknown = sorted(set(record) - set(_hints(Record)))
    if unknown:
        raise ValueError(f"record fields {unknown} are not in the record schema; declare them "
                         f"in ptqscale/store/schema.py (Record) and docs/records.md")
    for group in ("method", "quantization", "config"):
        if "format" in (record.get(group) or {}):
            raise ValueError(f"{group}.format: a record stores the format name once, in "
                             f"format.name (store it through stored_config/stored_method)")


# ---- checking a record and documenting its fields ---------------------------------------

def record_problems(record: Any) -> list[str]:
    """Every way ``record`` departs from ``Record`` (empty: it conforms), as ``path: what``."""
    return _problems(record, Record, "")


def field_paths(schema: Any = Record, prefix: str = "") -> list[str]:
    """The dotted field paths of ``schema``; an open mapping is ``<path>.*``.

    >>> field_paths(DataInfo, "data.")
    ['data.name', 'data.split']
    """
    out = []
    for key, hint in _hints(schema).items():
        if is_typeddict(hint):
            out += field_paths(hint, f"{prefix}{key}.")
        elif get_origin(hint) in (dict, Mapping):
            out.append(f"{prefix}{key}.*")
        else:
            out.append(f"{prefix}{key}")
    return out


def _hints(schema: Any) -> dict[str, Any]:
    return get_type_hints(schema)


def _problems(value: Any, hint: Any, path: str) -> list[str]:
    where = path or "record"
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return []
    if is_typeddict(hint):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {type(value).__name__}"]
        fields = _hints(hint)
        out = [f"{where}.{k}: missing" if path else f"{k}: missing"
               for k in sorted(hint.__required_keys__ - set(value))]
        for k, v in value.items():
            sub = f"{path}.{k}" if path else k
            out += _problems(v, fields[k], sub) if k in fields else [f"{sub}: not in the schema"]
        return out
    if origin in (Union, types.UnionType):
        if any(not _problems(value, a, path) for a in args):
            return []
        return [f"{where}: {value!r:.60} is none of {_name(hint)}"]
    if origin is Literal:
        return [] if value in args else [f"{where}: {value!r} is not one of {list(args)}"]
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {type(value).__name__}"]
        return [p for k, v in value.items() for p in _problems(v, args[1], f"{path}.{k}")]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [p for i, v in enumerate(value) for p in _problems(v, args[0], f"{path}[{i}]")]
    if _conforms(value, hint):
        return []
    return [f"{where}: expected {_name(hint)}, got {type(value).__name__}"]


def _conforms(value: Any, hint: Any) -> bool:
    if hint is type(None):
        return value is None
    if isinstance(value, bool):   # a bool is an int to Python, not to a record
        return hint is bool
    if hint is float:             # JSON writes 2.0 as 2.0, but a count-valued float as 2
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
