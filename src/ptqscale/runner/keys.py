"""Job keys: hashes of the semantic config (what changes a result), nothing else.

Left out on purpose: paths (results, caches, where a checkpoint or corpus file lies),
logging and tracking options, progress bars, the device and the placement (one piece or
streamed, the GPU memory cap: tests/models/test_streaming.py shows they change no number),
whether a worker keeps the model for its next jobs (``model.reuse``: tests/runner/test_reuse.py). A
model is identified by its ``name`` (+ revision and dtype; ``auto`` keys as the checkpoint's
dtype it resolves to, so it shares the records of that dtype spelled out), a corpus by its name and split: the same study run
from another folder or machine finds its finished jobs. Files that differ from those the
store first saw under a name add their fingerprints (``files``; runner/identity.py), so
other weights or text never share a key or a cached measurement.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, is_dataclass
from typing import Any

from ptqscale.metrics import PROTOCOL_VERSION
from ptqscale.metrics.registry import Metric, metrics_identity

# What a full-precision cache entry holds; a new version keys new entries, so entries of an
# older one are never read (never mistaken for corrupt). 2 (2026-12-05): the per-window NLL
# sums that the standard errors need.
FP_EVAL_CONTENT = 2

_MODEL_IGNORED = ("path", "device", "tokenizer", "placement", "max_gpu_memory", "gpus",
                  "reuse")
_DATA_IGNORED = ("path",)


def digest(obj: Any, n: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), first ``n`` hex digits."""
    text = json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _plain(obj: Any) -> Any:
    return asdict(obj) if is_dataclass(obj) else obj


def _without(obj: Any, ignored: tuple[str, ...]) -> dict:
    return {k: v for k, v in _plain(obj).items() if k not in ignored}


def model_identity(model_cfg: Any) -> dict:
    plain = _plain(model_cfg)
    ident = _without(plain, _MODEL_IGNORED)
    if not ident.get("stand_in"):   # counts only when on: real models keep their keys
        ident.pop("stand_in", None)
    if ident.get("dtype") == "auto":
        from ptqscale.models.config import checkpoint_dtype

        ident["dtype"] = checkpoint_dtype(plain["path"], plain.get("revision"),
                                          bool(plain.get("trust_remote_code")))
    return ident


def data_identity(data_cfg: Any) -> dict:
    return _without(data_cfg, _DATA_IGNORED)


def speed_only(cfg: Any) -> dict:
    """``cfg`` less the fields its class declares speed- or memory-only (``not_in_key``).

    A field that entered keys before it was declared so is hashed at the one value that
    every committed key used (``keyed_as``): the old keys stay, and no value re-keys a job.
    A field added after records were keyed (``added_later``: field -> the behaviour every
    earlier record had) counts only at another value, so adding it re-keys nothing.
    """
    cls = type(cfg)
    ignored = getattr(cls, "not_in_key", ())
    d = {**_without(cfg, ignored), **getattr(cls, "keyed_as", {})}
    for name, before in getattr(cls, "added_later", {}).items():
        if d.get(name) == before:
            d.pop(name, None)
    return d


def eval_identity(eval_cfg: Any) -> dict:
    """``eval.compile`` counts only when on: eager keys stay those of stores that predate it."""
    d = speed_only(eval_cfg)
    return d if d.get("compile") else {k: v for k, v in d.items() if k != "compile"}


def landscape_identity(landscape_cfg: Any) -> dict:
    """Landscape settings less those that change memory or speed, not the result."""
    return speed_only(landscape_cfg)


def _with_files(semantic: dict, files: dict | None, roles: tuple[str, ...]) -> dict:
    """``semantic`` plus the fingerprints of the ``roles`` whose files differ from the names'
    bindings (none: the key of the name alone, as in every store before bindings)."""
    differing = {r: files[r] for r in roles if files and r in files}
    return {**semantic, "files": differing} if differing else semantic


def fp_eval_key(model_cfg: Any, data_cfg: Any, eval_cfg: Any, files: dict | None = None) -> str:
    """Key of the model-level full-precision measurement shared by every job of a model."""
    return digest(_with_files({"model": model_identity(model_cfg),
                               "data": data_identity(data_cfg), "eval": eval_identity(eval_cfg),
                               "protocol": PROTOCOL_VERSION, "content": FP_EVAL_CONTENT},
                              files, ("model", "data")))


def landscape_key(model_cfg: Any, data_cfg: Any, eval_cfg: Any, landscape_cfg: Any,
                  files: dict | None = None) -> str:
    return digest(_with_files({"model": model_identity(model_cfg),
                               "data": data_identity(data_cfg), "eval": eval_identity(eval_cfg),
                               "landscape": landscape_identity(landscape_cfg),
                               "protocol": PROTOCOL_VERSION}, files, ("model", "data")))


def method_identity(method_cfg: Any) -> dict:
    """Method settings less those that change memory or speed, not the result."""
    return speed_only(method_cfg)


def calib_identity(calib_cfg: Any) -> dict:
    calib = _plain(calib_cfg)
    return {**calib, "data": data_identity(calib["data"])}


IDENTITY = {"model": model_identity, "data": data_identity, "eval": eval_identity,
            "method": method_identity, "calib": calib_identity,
            "landscape": landscape_identity}


def job_key(study: str, model_cfg: Any, data_cfg: Any, eval_cfg: Any, method_cfg: Any,
            calib_cfg: Any | None, landscape_cfg: Any | None, seed: int,
            identity: Callable[[str, Any], dict] | None = None, files: dict | None = None,
            metrics: Iterable[Metric] | None = None) -> str:
    """The key of one job; calibration and landscape settings count only when used, the
    metrics only when they are not the default set (``{name: version}``; metrics/registry.py).

    ``identity(kind, cfg)`` defaults to ``IDENTITY[kind](cfg)``; the planner passes a
    memoised one (``dataclasses.asdict`` of six configs per job dominates a 10^5-job plan).
    """
    ident = identity or (lambda kind, cfg: IDENTITY[kind](cfg))
    semantic = {
        "study": study,
        "model": ident("model", model_cfg),
        "data": ident("data", data_cfg),
        "eval": ident("eval", eval_cfg),
        "method": ident("method", method_cfg),
        "seed": seed,
        "protocol": PROTOCOL_VERSION,
    }
    if calib_cfg is not None:
        semantic["calib"] = ident("calib", calib_cfg)
    if landscape_cfg is not None:
        semantic["landscape"] = ident("landscape", landscape_cfg)
    asked = metrics_identity(metrics, eval_cfg) if metrics is not None else None
    if asked is not None:
        semantic["metrics"] = asked
    return digest(_with_files(semantic, files, ("model", "data", "calib")))
