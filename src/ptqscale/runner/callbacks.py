"""Hydra callbacks: at the end of a sweep, consolidate the store and print where things are."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("ptqscale")

SUMMARY_COLUMNS = ["model.name", "format.name", "method.name", "format.bits_per_weight",
                   "metrics.nll", "metrics.nll_fp", "metrics.dnll", "metrics.weight_sqnr_db",
                   "metrics.model_bytes"]


class StudySummary(Callback):
    """Writes ``records.parquet`` and ``summary.md`` for the study and prints the paths."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print(summarize_study(config.paths.results, config.study, config.wandb.dir))


def summarize_study(results: str, study: str, wandb_dir: str | None = None) -> str:
    """Consolidate a study; return a short text that says where records and summary are."""
    from ptqscale.store import atomic_write_text, consolidate, read_records

    root = Path(results)
    if not (root / study / "records").is_dir():
        return f"no records for study {study!r} under {root}"
    parquet = consolidate(root, study)
    frame = read_records(root, study, status=None)
    done = frame[frame["status"] == "complete"]
    failed = frame[frame["status"] == "failed"]
    cols = [c for c in SUMMARY_COLUMNS if c in done.columns]
    table = done[cols].sort_values(cols[:3]).to_markdown(index=False, floatfmt=".4f") \
        if not done.empty else "(no complete jobs)"
    summary = root / study / "summary.md"
    atomic_write_text(summary, f"# {study}\n\n{len(done)} complete, {len(failed)} failed\n\n{table}\n")
    lines = [
        f"study {study}: {len(done)} complete, {len(failed)} failed",
        f"  records:  {root / study / 'records'}/  (consolidated: {parquet})",
        f"  summary:  {summary}",
    ]
    if wandb_dir:
        lines.append(f"  W&B runs: {Path(wandb_dir) / 'wandb'}/  (offline runs: `wandb sync` them)")
    return "\n".join(lines)
