"""The W&B mirror: one run per job, resumable, never able to fail the job.

The local store is the source of truth; W&B mirrors it. The run id is the job key, so a
re-run resumes the same W&B run instead of adding a duplicate. Without an API key the
mirror writes offline runs (``wandb sync <dir>`` uploads them later).
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("ptqscale")

_LAYER_COLUMNS = ("name", "numel", "sqnr_db", "padded")
# The run's config holds the record's descriptive fields under their record names
# (model, format, method, ...); measured values go to the summary as "metrics/nll" etc.
# ptqscale_analysis.load_wandb reads them back into the same columns as the store.
_NOT_CONFIG = ("layers", "metrics", "params", "landscape", "timings", "wandb", "error", "status")


def resolve_mode(mode: str) -> str:
    """``auto`` -> ``online`` when an API key is configured, else ``offline``."""
    if mode != "auto":
        return mode
    has_key = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
    return "online" if has_key else "offline"


def _netrc_has_wandb() -> bool:
    path = os.path.expanduser("~/.netrc")
    try:
        with open(path) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


def mirror_record(record: dict, cfg: Any) -> dict:
    """Mirror one record to W&B; returns the status dict stored in the record."""
    mode = resolve_mode(cfg.mode)
    if mode == "disabled":
        return {"status": "disabled"}
    try:
        run_dir = _log_run(record, cfg, mode)
    except Exception as e:  # noqa: BLE001 - the mirror must never fail the job
        log.warning("W&B mirror failed for %s: %s: %s", record["name"], type(e).__name__, e)
        return {"status": "failed", "mode": mode, "error": f"{type(e).__name__}: {e}"}
    return {"status": mode, "run_id": record["job_key"], "project": cfg.project, "dir": run_dir}


def _log_run(record: dict, cfg: Any, mode: str) -> str:
    import wandb

    os.makedirs(cfg.dir, exist_ok=True)
    run = wandb.init(
        project=cfg.project, entity=cfg.entity, dir=cfg.dir, mode=mode,
        id=record["job_key"], resume="allow", name=record["name"],
        group=record["study"], job_type=record["method"]["name"],
        config={k: v for k, v in record.items() if k not in _NOT_CONFIG},
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    try:
        run.summary.update(_summary(record))
        layers = record.get("layers") or []
        if layers:
            table = wandb.Table(columns=list(_LAYER_COLUMNS),
                                data=[[layer.get(c) for c in _LAYER_COLUMNS] for layer in layers])
            run.log({"layers": table})
        return os.path.dirname(run.dir)   # the run folder (run.dir is its files/)
    finally:
        run.finish(exit_code=0 if record["status"] == "complete" else 1)


def _summary(record: dict) -> dict:
    out: dict[str, Any] = {"status": record["status"]}
    for group in ("metrics", "params", "landscape", "timings"):
        for k, v in (record.get(group) or {}).items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                out[f"{group}/{k}"] = v
    out["format/bits_per_weight"] = record["format"].get("bits_per_weight")
    return out
