"""Hydra callbacks: validate before Hydra writes anything; at the end of a sweep,
consolidate the store, write the summary and report every job that did not succeed.

The end of a sweep runs whatever failed (jobs never raise out of the task function, see
runner/outcomes.py), so ``records.parquet`` and ``summary.md`` are always written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ptqscale.runner import outcomes

log = logging.getLogger("ptqscale")

SUMMARY_COLUMNS = ["model.name", "format.name", "method.name", "format.bits_per_weight",
                   "metrics.nll", "metrics.nll_fp", "metrics.dnll", "metrics.dnll_se",
                   "metrics.weight_sqnr_db",
                   "metrics.model_bytes"]


class StudySummary(Callback):
    """Checks inputs first; writes ``records.parquet`` and ``summary.md`` for the study."""

    def __init__(self) -> None:
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A single job: the whole config is checked before Hydra creates its run folder."""
        from ptqscale.runner.job import validate_job

        with _abort_on_error():
            validate_job(config)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        done = outcomes.in_process_outcomes()
        if any(o["status"] != "complete" for o in done):
            print(outcomes.report(done)[0])

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep: what every grid point shares (the study name, root keys) is checked
        before Hydra creates the sweep folder; each grid point is checked by its job."""
        from ptqscale.runner.config import refuse_unknown_root_keys
        from ptqscale.store import check_study

        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with _abort_on_error():
            check_study(config.study)
            refuse_unknown_root_keys(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        found = outcomes.read_outcomes(config.hydra.sweep.dir)
        studies = sorted({o["study"] for o in found} or {str(config.study)})
        for study in studies:
            try:
                print(summarize_study(config.paths.results, study, config.wandb.dir,
                                      since=self.started))
            except Exception as e:  # noqa: BLE001 - the job report below must still come
                print(f"study {study}: could not write its summary ({type(e).__name__}: {e})")
        text, status = outcomes.report(found)
        print(text)
        outcomes.set_sweep_exit(status)


@contextmanager
def _abort_on_error() -> Iterator[None]:
    try:
        yield
    except Exception as e:
        raise outcomes.Abort(e) from e


def summarize_study(results: str, study: str, wandb_dir: str | None = None,
                    since: str | None = None) -> str:
    """Consolidate a study; return a short text that says where records and summary are.

    Invalid records are counted and listed only when written at or after ``since`` (the
    start of the launch): older ones belong to grid points this launch did not include.
    """
    from ptqscale.store import atomic_write_text, consolidate, read_record, read_records

    root = Path(results)
    if not (root / study / "records").is_dir():
        return f"no records for study {study!r} under {root}"
    parquet = consolidate(root, study)
    frame = read_records(root, study, status=None)
    done = frame[frame["status"] == "complete"]
    failed = frame[frame["status"] == "failed"]
    invalid = frame[frame["status"] == "invalid"]
    if since is not None and not invalid.empty:
        invalid = invalid[invalid["created_at"].astype(str) >= since]
    cols = [c for c in SUMMARY_COLUMNS if c in done.columns]
    cols += [c for c in _headline_columns(done) if c not in cols]   # further metrics asked for
    table = done[cols].sort_values(cols[:3]).to_markdown(index=False, floatfmt=".4f") \
        if not done.empty else "(no complete jobs)"
    problems = "".join(f"\n- {kind} `{name}`: {_reason(read_record(root, study, key))}"
                       for kind, rows in (("failed", failed), ("invalid", invalid))
                       for key, name in zip(rows["job_key"], rows["name"]))
    counts = f"{len(done)} complete, {len(failed)} failed, {len(invalid)} invalid"
    summary = root / study / "summary.md"
    atomic_write_text(summary, f"# {study}\n\n{counts}\n\n{table}\n"
                      + (f"\n## Not complete\n{problems}\n" if problems else ""))
    lines = [
        f"study {study}: {counts}",
        f"  records:  {root / study / 'records'}/  (consolidated: {parquet})",
        f"  summary:  {summary}",
    ]
    if wandb_dir and (Path(wandb_dir) / "wandb").is_dir():
        lines.append(f"  W&B runs: {Path(wandb_dir) / 'wandb'}/  (offline runs: "
                     f"`ptqscale-sync --results {root} --study {study}` uploads them)")
    return "\n".join(lines)


def _headline_columns(frame) -> list[str]:
    """``metrics.<headline>`` of every metric the records declare (``metric_info``)."""
    names = {v for c in frame.columns if c.startswith("metric_info.") and c.endswith(".headline")
             for v in frame[c].dropna()}
    return [f"metrics.{n}" for n in sorted(names) if f"metrics.{n}" in frame.columns]


def _reason(record: dict | None) -> str:
    error = (record or {}).get("error") or {}
    return " ".join(f"{error.get('type', '')}: {error.get('message', '')}".split())[:500]
