"""Figures of a study, one function per figure; each returns a matplotlib Figure.

Uses the Agg backend (files, no display), so it runs on servers and in CI.

Example::

    >>> fig = plot_nll_vs_params(load_study("results", "quickstart"))    # doctest: +SKIP
    >>> fig.savefig("nll_vs_params.png")                                  # doctest: +SKIP
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice, on purpose)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ptqscale_analysis.errors import AnalysisError  # noqa: E402
from ptqscale_analysis.study_fits import SQNR_COLUMN, StudyFits  # noqa: E402


def _figure(ncols: int = 1, width: float = 6.0) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 4.2), squeeze=False)
    return fig, axes[0]


def plot_nll_vs_params(frame: pd.DataFrame, size_column: str = "params.total") -> Figure:
    """NLL against parameters, one line per (format, method), one panel per family."""
    families = sorted(frame["model.family"].unique())
    fig, axes = _figure(len(families))
    for ax, fam in zip(axes, families):
        rows = frame[frame["model.family"] == fam]
        for (fmt, method), g in rows.groupby(["format.name", "method.name"], sort=True):
            g = g.sort_values(size_column)
            style = dict(color="k", lw=2) if method == "none" else dict(marker="o", ms=3)
            ax.plot(g[size_column], g["metrics.nll"], label=f"{fmt} / {method}", **style)
        ax.set(xscale="log", xlabel=f"parameters ({size_column})", ylabel="NLL (nats)",
               title=f"family {fam}")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def plot_dnll_vs_sqnr(frame: pd.DataFrame, fits: StudyFits | None = None,
                      size_column: str = "params.blocks") -> Figure:
    """dNLL against weight SQNR, coloured by size, with the fitted noise law per size."""
    q = frame[~frame["is_baseline"] & (frame["dnll"] > 0)]
    if q.empty or SQNR_COLUMN not in q:
        raise AnalysisError("no quantized rows with positive dNLL and weight SQNR to plot")
    groups = sorted(q.groupby(["model.family", "method.name"]).groups)
    fig, axes = _figure(len(groups), width=4.5)
    sizes = sorted(q[size_column].unique())
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    for ax, (fam, method) in zip(axes, groups):
        rows = q[(q["model.family"] == fam) & (q["method.name"] == method)]
        fit = fits.get("noise", **{"model.family": fam, "method.name": method}) if fits else None
        s_grid = np.linspace(rows[SQNR_COLUMN].min() - 2, rows[SQNR_COLUMN].max() + 2, 50)
        for n, color in zip(sizes, colors):
            g = rows[rows[size_column] == n]
            if g.empty:
                continue
            ax.scatter(g[SQNR_COLUMN], g["dnll"], color=color, s=12, label=f"N={n:.3g}")
            if fit is not None:
                ax.plot(s_grid, fit.predict(n=n, sqnr=s_grid), color=color, lw=1)
        ax.set(yscale="log", xlabel="weight SQNR (dB)", ylabel="dNLL (nats)",
               title=f"{fam} / {method}" + (" (lines: noise law)" if fit else ""))
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_predicted_vs_measured(predictions: pd.DataFrame,
                               models: tuple[str, ...] = ("forest", "noise")) -> Figure:
    """Out-of-fold predicted dNLL against measured, for the forest and a law (log axes)."""
    fig, (ax,) = _figure(1, width=5.0)
    y = predictions["measured"]
    for m in models:
        if m in predictions and predictions[m].notna().any():
            ax.scatter(y, predictions[m], s=10, alpha=0.7, label=m)
    pos = y[y > 0]
    lims = [pos.min() / 2, pos.max() * 2] if len(pos) else [1e-4, 1]
    ax.plot(lims, lims, "k--", lw=1, label="y = x")
    ax.set(xscale="log", yscale="log", xlabel="measured dNLL", ylabel="predicted dNLL",
           title="held-out predictions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_pareto(frame: pd.DataFrame, frontier: pd.DataFrame) -> Figure:
    """Model bytes against NLL for every record, with the Pareto frontier drawn through."""
    fig, (ax,) = _figure(1, width=6.5)
    ax.scatter(frame["model_bytes"], frame["metrics.nll"], s=8, color="0.7", label="records")
    ax.plot(frontier["model_bytes"], frontier["metrics.nll"], "o-", color="C3", ms=4,
            label="Pareto frontier")
    for _, r in frontier.iterrows():
        ax.annotate(f"{r['model.name']} {r['format.name']}", (r["model_bytes"], r["metrics.nll"]),
                    fontsize=5, xytext=(2, 2), textcoords="offset points")
    ax.set(xscale="log", xlabel="model bytes", ylabel="NLL (nats)", title="memory vs quality")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def noise_response_columns(frame: pd.DataFrame) -> dict[float, str]:
    """{SQNR level in dB: column} for the ``landscape.dnll_at_<s>db`` columns present."""
    out = {}
    for c in frame.columns:
        if c.startswith("landscape.dnll_at_") and c.endswith("db"):
            try:
                out[float(c[len("landscape.dnll_at_"):-2])] = c
            except ValueError:
                continue
    return dict(sorted(out.items()))


def plot_noise_response(frame: pd.DataFrame) -> Figure:
    """dNLL under Gaussian weight noise against its SQNR, one curve per model."""
    cols = noise_response_columns(frame)
    if not cols:
        raise AnalysisError("no noise-response features (landscape.dnll_at_<s>db) in the "
                            "records; measure the landscape to get this figure")
    fig, (ax,) = _figure(1)
    models = frame.drop_duplicates("model.name").sort_values("params.total")
    for _, m in models.iterrows():
        levels = [s for s, c in cols.items() if pd.notna(m.get(c))]
        if levels:
            ax.plot(levels, [m[cols[s]] for s in levels], "o-", ms=3, label=m["model.name"])
    ax.set(yscale="log", xlabel="noise SQNR (dB)", ylabel="dNLL (nats)",
           title="noise response (radial landscape)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig
