"""The W&B mirror: one run per job, resumable, never able to fail or stall the job.

The local store is the source of truth; W&B mirrors it. A run is opened when the job's
record is written (its end), not at its start: W&B then never shows a run that the store
does not have, and a killed job leaves nothing to clean up there. The run id is the job
key, so a re-run resumes the same W&B run instead of adding a duplicate.

What a run holds:
- config: settings only (the resolved job config and the record's descriptive fields:
  model, data, format, method, eval, env, identity);
- summary: everything measured, flattened as ``metrics/nll``, ``quantization/cost/...``;
- tags: ``family:``, ``size:``, ``format:``, ``method:``, ``data:`` and the study;
- the per-layer table (every per-layer field) and the record itself as an artifact.

``mode: auto`` is online when W&B's own login detection finds an API key for the configured
server (``WANDB_API_KEY``, or ``$NETRC``/``~/.netrc`` for ``WANDB_BASE_URL``'s host), else
offline. An online mirror first checks that the server answers (``probe_timeout`` seconds);
if it does not, the run is written offline and the record says so, so a job never waits on
an unreachable server. ``ptqscale-sync`` later mirrors what is pending or failed and uploads
offline runs.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ptqscale.store.wandb_mode import PROBE_TIMEOUT, base_url, resolve_mode, server_answers

log = logging.getLogger("ptqscale")

# Record fields that describe the job (config); everything else measured goes to summary.
_CONFIG = ("study", "name", "job_key", "protocol_version", "model", "data", "eval", "method",
           "format", "config", "env", "identity", "created_at", "metric_info")
_SUMMARY = ("metrics", "params", "landscape", "timings", "quantization")

def needs_mirror(record: dict, mode: str) -> bool:
    """A record whose mirror is pending (killed between record and mirror) or failed.

    Runs written offline (by choice or by fallback) are complete mirrors; ``ptqscale-sync``
    uploads them when the server answers.
    """
    status = (record.get("wandb") or {}).get("status")
    return status in ("pending", "failed", None) and resolve_mode(mode) != "disabled"


def mirror_record(record: dict, cfg: Any) -> dict:
    """Mirror one record to W&B; returns the status dict stored in the record."""
    mode = resolve_mode(cfg.mode)
    if mode == "disabled":
        return {"status": "disabled"}
    fallback = None
    if mode == "online" and not server_answers(base_url()):
        fallback = f"server {base_url()} did not answer within {PROBE_TIMEOUT:g} s"
        log.warning("W&B: %s; %s mirrored offline (ptqscale-sync uploads it later)",
                    fallback, record["name"])
        mode = "offline"
    try:
        run_dir = _log_run(record, cfg, mode)
    except Exception as e:  # noqa: BLE001 - the mirror must never fail the job
        log.warning("W&B mirror failed for %s: %s: %s", record["name"], type(e).__name__, e)
        return {"status": "failed", "mode": mode, "error": f"{type(e).__name__}: {e}"}
    out = {"status": mode, "run_id": record["job_key"], "project": cfg.project, "dir": run_dir}
    return out | ({"fallback": fallback} if fallback else {})


def tags(record: dict) -> list[str]:
    """``family:``, ``size:``, ``format:``, ``method:``, ``data:`` and ``study:`` tags."""
    model, data = record.get("model") or {}, record.get("data") or {}
    pairs = [("study", record.get("study")), ("family", model.get("family")),
             ("size", model.get("size")), ("model", model.get("name")),
             ("format", (record.get("format") or {}).get("name")),
             ("method", (record.get("method") or {}).get("name")),
             ("data", data.get("name"))]
    return [f"{k}:{v}"[:64] for k, v in pairs if v is not None]


def run_config(record: dict) -> dict:
    return {k: record[k] for k in _CONFIG if k in record}


def run_summary(record: dict) -> dict:
    """Measured values, flattened with "/" (``metrics/nll``, ``quantization/cost/seconds``)."""
    out: dict[str, Any] = {"status": record["status"]}
    for group in _SUMMARY:
        _flatten(out, group, record.get(group) or {})
    out["format/bits_per_weight"] = (record.get("format") or {}).get("bits_per_weight")
    if record.get("error"):
        out["error/type"] = record["error"].get("type")
        out["error/message"] = record["error"].get("message")
    return out


def _flatten(out: dict, prefix: str, node: dict) -> None:
    for k, v in node.items():
        name = f"{prefix}/{k}"
        if isinstance(v, dict):
            _flatten(out, name, v)
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[name] = v


def _layer_table(layers: list[dict]):
    import wandb

    columns = sorted({k for layer in layers for k, v in layer.items()
                      if not isinstance(v, (dict, list))} - {"name"})
    columns = ["name", *columns]
    return wandb.Table(columns=columns, data=[[layer.get(c) for c in columns] for layer in layers])


def _log_run(record: dict, cfg: Any, mode: str) -> str:
    import wandb

    os.makedirs(cfg.dir, exist_ok=True)
    run = wandb.init(
        project=cfg.project, entity=cfg.entity, dir=cfg.dir, mode=mode,
        id=record["job_key"], resume="allow", name=record["name"],
        group=record["study"], job_type=record["method"]["name"], tags=tags(record),
        config=run_config(record),
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                init_timeout=30.0),
    )
    try:
        run.summary.update(run_summary(record))
        if record.get("layers"):
            run.log({"layers": _layer_table(record["layers"])})
        run.log_artifact(_record_artifact(record))
        return os.path.dirname(run.dir)   # the run folder (run.dir is its files/)
    finally:
        run.finish(exit_code=0 if record["status"] == "complete" else 1)


def _record_artifact(record: dict):
    import json
    import tempfile

    import wandb

    art = wandb.Artifact(f"record-{record['job_key']}", type="ptqscale-record",
                         metadata={"study": record["study"], "name": record["name"]})
    with tempfile.TemporaryDirectory() as tmp:  # add_file stages a copy (mutable policy)
        path = os.path.join(tmp, "record.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=1, default=str)
        art.add_file(path, name="record.json")
    return art


def sync_study(results: str, study: str, cfg: Any, upload_offline: bool = True) -> dict:
    """Mirror every record of ``study`` whose mirror is pending or failed (or offline by
    fallback, when the server now answers), then ``wandb sync`` its offline runs if online.

    Returns counts: ``{"mirrored": n, "failed": n, "uploaded": n}``.
    """
    from ptqscale.store import iter_records, write_record

    counts = {"mirrored": 0, "failed": 0, "uploaded": 0}
    mode = resolve_mode(cfg.mode)
    for record in iter_records(results, study):
        if not needs_mirror(record, cfg.mode):
            continue
        record["wandb"] = mirror_record(record, cfg)
        write_record(results, record)
        counts["failed" if record["wandb"]["status"] == "failed" else "mirrored"] += 1
    if upload_offline and mode == "online" and server_answers(base_url()):
        counts["uploaded"] = _upload_offline(results, study)
    return counts


def _upload_offline(results: str, study: str) -> int:
    """``wandb sync`` every offline run folder of the study's records (then mark them online)."""
    import subprocess
    import sys

    from ptqscale.store import iter_records, write_record

    done = 0
    for record in iter_records(results, study):
        state = record.get("wandb") or {}
        if state.get("status") != "offline" or not state.get("dir"):
            continue
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "wandb", "sync", state["dir"]],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            record["wandb"] = state | {"status": "online", "uploaded_from": state["dir"],
                                       "upload_s": time.perf_counter() - t0}
            record["wandb"].pop("fallback", None)
            write_record(results, record)
            done += 1
        else:
            log.warning("wandb sync %s failed: %s", state["dir"], proc.stderr.strip()[-300:])
    return done


def sync_main(argv: list[str] | None = None) -> None:
    """``ptqscale-sync``: mirror a study's pending/failed records and upload offline runs."""
    import argparse

    from ptqscale.runner.config import WandbConfig

    p = argparse.ArgumentParser(prog="ptqscale-sync", description=sync_main.__doc__)
    p.add_argument("--results", default="results")
    p.add_argument("--study", required=True)
    p.add_argument("--project", default="ptqscale")
    p.add_argument("--entity", default=None)
    p.add_argument("--mode", default="auto", choices=["auto", "online", "offline"])
    p.add_argument("--no-upload", action="store_true", help="do not `wandb sync` offline runs")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.results, args.study, "records")):
        raise SystemExit(f"error: no records for study {args.study!r} under {args.results}, "
                         "--results/--study, a study folder holding records/")
    cfg = WandbConfig(mode=args.mode, project=args.project, entity=args.entity,
                      dir=os.path.join(args.results, "_wandb"))
    counts = sync_study(args.results, args.study, cfg, upload_offline=not args.no_upload)
    print(f"study {args.study}: {counts['mirrored']} mirrored, {counts['failed']} failed, "
          f"{counts['uploaded']} offline runs uploaded")
    if counts["failed"]:
        raise SystemExit(1)
