"""The study-level W&B run: a study's report, figures and fitted laws, beside its job runs.

One run per study (id ``study-<study>``, job type ``report``, in the jobs' group), so the
W&B project shows the study's answer next to the runs it came from: every figure as an
image, the report folder (Markdown, HTML, PNG) as an artifact, and the laws table.
Re-running the report updates the same run. W&B is imported only here and only when asked
for (``ptqscale-report --wandb-project``); the analysis package stays torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def mirror_study(report_dir: str | os.PathLike, study: str, project: str,
                 entity: str | None = None, mode: str = "auto",
                 laws: pd.DataFrame | None = None, wandb_dir: str | None = None) -> str:
    """Log ``report_dir`` (report.md/html, figures/*.png) as the study run; returns its mode."""
    import wandb

    from ptqscale.store.wandb_mode import base_url, resolve_mode, server_answers

    mode = resolve_mode(mode)
    if mode == "online" and not server_answers(base_url()):
        mode = "offline"
    report_dir = Path(report_dir)
    run = wandb.init(project=project, entity=entity, mode=mode, id=f"study-{study}",
                     resume="allow", name=f"{study} (report)", group=study, job_type="report",
                     tags=[f"study:{study}", "report"], dir=wandb_dir,
                     config={"study": study, "report_dir": str(report_dir)},
                     settings=wandb.Settings(silent=True, console="off",
                                             x_disable_stats=True, init_timeout=30.0))
    try:
        figures = sorted((report_dir / "figures").glob("*.png"))
        run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in figures})
        if laws is not None and not laws.empty:
            run.log({"laws": wandb.Table(dataframe=laws.astype(str))})
        art = wandb.Artifact(f"report-{study}", type="ptqscale-report")
        art.add_dir(str(report_dir))
        run.log_artifact(art)
        return mode
    finally:
        run.finish()
