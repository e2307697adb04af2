"""The study-level W&B run: figures, laws and the report folder, written offline here."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runner"))
import wandb_offline  # noqa: E402

from ptqscale_analysis.wandb_study import mirror_study  # noqa: E402


def test_study_run_holds_figures_laws_and_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    report = tmp_path / "report"
    (report / "figures").mkdir(parents=True)
    plt.plot([1, 2], [3, 4])
    plt.savefig(report / "figures" / "nll_vs_params.png")
    (report / "report.md").write_text("# report\n")
    laws = pd.DataFrame({"law": ["power"], "alpha": [0.3]})
    mode = mirror_study(report, "demo", "proj", mode="offline", laws=laws,
                        wandb_dir=str(tmp_path / "wb"))
    assert mode == "offline"
    (run_file,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-study-demo.wandb")
    summary = wandb_offline.summary(run_file)
    assert summary["figures/nll_vs_params/_type"] == "image-file"
    assert summary["laws/_type"] == "table-file" and summary["laws/nrows"] == 1
    kinds = [r.WhichOneof("record_type") for r in wandb_offline.records(run_file)]
    assert kinds.count("artifact") == 2  # the laws table's and the report folder's
