"""What became of each grid point of a launch, and the report at the end of a sweep.

Every grid point ends in one outcome: ``complete`` (run now or already in the store),
``failed`` (a failure record), ``invalid`` (its config does not validate: an ``invalid``
record with the reason) or ``busy`` (another live process runs it: no record; neither a
success nor a failure). A job never raises out of the task function, so that no launcher
or sweeper stops a sweep at the first failure (Hydra's BasicSweeper re-raises the first
failed job of a batch, which with ``max_batch_size`` drops every later batch).

Each job writes its outcome to ``ptqscale_outcome.json`` in its Hydra output folder (the
joblib and submitit launchers run jobs in other processes); the sweep's end reads them
back, lists every failure and invalid point with its reason, and sets the exit status:
0 when nothing failed or was invalid, 1 otherwise (2 is a bad input found before any job).

An invalid grid point has no semantic key (its config may not even build one), so its
record is keyed by the study and the job's overrides: ``invalid-<digest>``. When that
grid point validates in a later launch, the invalid record is deleted before the job runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ptqscale.runner.keys import digest

log = logging.getLogger("ptqscale")

OUTCOME_FILE = "ptqscale_outcome.json"


class Abort(BaseException):
    """Carries a bad input found in a Hydra callback out of Hydra (which turns a callback's
    Exception into a warning and goes on) to the CLI's error report."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error

# Outcomes of the jobs run in this process (single runs and the basic launcher).
_IN_PROCESS: list[dict] = []
# Set by the end of a multirun; None: derive from _IN_PROCESS.
_SWEEP_EXIT: list[int] = []


def job_overrides() -> list[str]:
    """The overrides that make this Hydra job (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# Overrides of keys that never enter a job key (where results go, logging, the tracker).
_NOT_IDENTITY = ("paths.", "wandb.", "hydra.", "progress=", "exclusive_gpu=")


def invalid_key(study: str, overrides: list[str]) -> str:
    """Key of the invalid record of a grid point: its study and its (sorted) overrides,
    less those that cannot change a result (``paths.results=...``, ``wandb.mode=...``)."""
    kept = sorted(o for o in overrides if not o.lstrip("+~").startswith(_NOT_IDENTITY))
    return "invalid-" + digest({"study": study, "overrides": kept})


def run_grid_point(cfg: Any) -> dict[str, Any]:
    """Run one job and return its outcome (``status``, ``key``, ``name``, ``reason``);
    failures and invalid configs become outcomes.

    Outside a multirun a config error propagates (the CLI prints one line, exit 2).
    """
    from ptqscale.errors import ConfigError
    from ptqscale.runner.job import JobFailed, run_job

    overrides = job_overrides()
    outcome: dict[str, Any] = {"overrides": overrides, "study": str(cfg.get("study"))}
    try:
        record = run_job(cfg)
        forget_invalid(str(cfg.paths.results), outcome["study"])
        outcome.update(status=record["status"], name=record.get("name"),
                       key=record.get("job_key"), reason=record.get("holder"))
    except JobFailed as e:
        forget_invalid(str(cfg.paths.results), outcome["study"])
        outcome.update(status="failed", reason=str(e), name=str(e).split(" failed:")[0])
    except ConfigError as e:
        if not _in_multirun():
            raise
        outcome.update(status="invalid", reason=str(e), name=" ".join(overrides))
        outcome["key"] = _write_invalid(cfg, overrides, str(e))
    except Exception as e:  # noqa: BLE001 - a bug in one job must not stop the sweep
        log.exception("job %s raised", " ".join(overrides))
        outcome.update(status="failed", reason=f"{type(e).__name__}: {e}",
                       name=" ".join(overrides))
    record_outcome(outcome)
    return outcome


def _write_invalid(cfg: Any, overrides: list[str], reason: str) -> str | None:
    """The invalid record of a grid point, or None where its study cannot hold one."""
    from datetime import datetime, timezone

    from ptqscale.store import write_record

    study = str(cfg.get("study"))
    key = invalid_key(study, overrides)
    try:
        write_record(str(cfg.paths.results), {
            "job_key": key, "study": study, "status": "invalid", "name": " ".join(overrides),
            "overrides": overrides, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "error": {"type": "ConfigError", "message": reason}})
    except Exception as e:  # noqa: BLE001 - e.g. a study name that is not a folder name
        log.warning("no invalid record for %s: %s", " ".join(overrides), e)
        return None
    log.info("[invalid] %s: %s", " ".join(overrides), reason)
    return key


def forget_invalid(results: str, study: str) -> None:
    """Delete this grid point's invalid record, if any: its config validates now."""
    from ptqscale.store import record_path

    record_path(results, study, invalid_key(study, job_overrides())).unlink(missing_ok=True)


def record_outcome(outcome: dict) -> None:
    """Keep ``outcome`` for this process and write it into the Hydra job's output folder."""
    from hydra.core.hydra_config import HydraConfig

    _IN_PROCESS.append(outcome)
    if HydraConfig.initialized() and _in_multirun():
        out = Path(HydraConfig.get().runtime.output_dir) / OUTCOME_FILE
        out.write_text(json.dumps(outcome))


def read_outcomes(sweep_dir: str | Path) -> list[dict]:
    """The outcomes every job of a sweep wrote under ``sweep_dir``, in job order."""
    found = []
    for path in Path(sweep_dir).rglob(OUTCOME_FILE):
        try:
            found.append((path.parent.name, json.loads(path.read_text())))
        except (OSError, ValueError) as e:
            log.warning("unreadable job outcome %s: %s", path, e)
    return [o for _, o in sorted(found, key=lambda p: (len(p[0]), p[0]))]


def report(outcomes: list[dict]) -> tuple[str, int]:
    """The end-of-sweep text (counts, then every failure, invalid and busy point) and the
    exit status: 0 when no job failed or was invalid, else 1."""
    counts = {s: sum(o["status"] == s for o in outcomes)
              for s in ("complete", "failed", "invalid", "busy")}
    lines = [f"{len(outcomes)} jobs: {counts['complete']} complete, {counts['failed']} failed, "
             f"{counts['invalid']} invalid, {counts['busy']} running elsewhere"]
    labels = {"failed": "FAILED", "invalid": "INVALID", "busy": "RUNNING ELSEWHERE"}
    for o in outcomes:
        if o["status"] in labels:
            why = " ".join(str(o.get("reason") or "").split())
            why = why if len(why) <= 300 else why[:297] + "..."
            lines.append(f"  {labels[o['status']]} {o.get('name') or ''}: {why}".rstrip(": "))
    return "\n".join(lines), int(counts["failed"] + counts["invalid"] > 0)


def set_sweep_exit(status: int) -> None:
    _SWEEP_EXIT.append(status)


def exit_status() -> int:
    """The process exit status after Hydra returns: the sweep's, else this process's jobs'."""
    if _SWEEP_EXIT:
        return max(_SWEEP_EXIT)
    return report(_IN_PROCESS)[1]


def in_process_outcomes() -> list[dict]:
    return list(_IN_PROCESS)
