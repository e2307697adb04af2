"""Figures of a study, one function per figure; each returns a matplotlib Figure.

Rules every figure keeps, because NLLs of different corpora, tokenizers or activation
schemes are not comparable: one panel row per (corpus, model family) -- a family has one
tokenizer --, and a line never joins records of two corpora, families, formats, methods or
activation schemes. Each panel's ``gid`` names its slice (``data.name=...|model.family=...``)
so tests can check every line against it. Legends are faceted (one column of panels per
format family) so that no two entries of a panel share a colour and marker.

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
from matplotlib.lines import Line2D  # noqa: E402

from ptqscale_analysis.errors import AnalysisError  # noqa: E402
from ptqscale_analysis.study_fits import SQNR_COLUMN, StudyFits  # noqa: E402

PANEL_COLUMNS = ("data.name", "model.family")
PROTOCOL_COLUMNS = ("eval.preset", "eval.seqlen")
FORMAT_GROUPS = {"int": "integer", "mx": "microscaling (MX)", "fp": "float, NVFP4, NF4",
                 "nvfp4": "float, NVFP4, NF4", "nf4": "float, NVFP4, NF4"}
COLORS = plt.cm.tab10.colors
MARKERS = "osD^vP*Xh<>"
LINESTYLES = ("-", "--", ":", "-.")


def panels(frame: pd.DataFrame, min_sizes: int = 1) -> tuple[list[tuple[dict, pd.DataFrame]],
                                                                list[str]]:
    """[(slice, rows)] per (corpus, family), and notes on slices with < ``min_sizes`` sizes."""
    # the evaluation protocol splits too, where a study varies it (NLL at another seqlen)
    extra = [c for c in PROTOCOL_COLUMNS if c in frame and frame[c].astype(str).nunique() > 1]
    cols = [c for c in PANEL_COLUMNS if c in frame] + extra
    out, notes = [], []
    groups = frame.groupby(cols, sort=True, dropna=False) if cols else [((), frame)]
    for key, rows in groups:
        where = dict(zip(cols, map(str, np.atleast_1d(key))))
        if rows["model.name"].nunique() < min_sizes:
            notes.append(f"{_title(where)}: {rows['model.name'].nunique()} model size, no curve")
            continue
        out.append((where, rows))
    return out, notes


def _title(where: dict) -> str:
    return " / ".join(f"{k.rpartition('.')[2]} {v}" if k in PROTOCOL_COLUMNS else v
                      for k, v in where.items())


def _gid(where: dict) -> str:
    return "|".join(f"{k}={v}" for k, v in where.items())


def _grid(nrows: int, ncols: int, width: float = 4.6, height: float = 3.4, **kw):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                             squeeze=False, **kw)
    return fig, axes


def _note(fig: Figure, notes: list[str]) -> None:
    if notes:
        fig.text(0.01, 0.002, "not drawn: " + "; ".join(notes), fontsize=7, color="0.35",
                 va="bottom")


def _facets(q: pd.DataFrame) -> tuple[str, str, str | None]:
    """(column facet, colour key, linestyle key): few methods -> formats coloured, faceted by
    format family, methods as line styles; many methods -> one column per format."""
    if q["method.name"].nunique() <= len(LINESTYLES):
        return "_group", "format.name", "method.name"
    return "format.name", "method.name", None


def plot_nll_vs_params(frame: pd.DataFrame, size_column: str = "params.total",
                       y: str = "metrics.nll") -> Figure:
    """``y`` (NLL, or dNLL on log axes) against parameters: a row of panels per (corpus,
    family), a column per format family (or per format when many methods are compared), one
    line per (format, method), the full-precision NLL in black (NLL only)."""
    log_y = y == "dnll"
    q = frame[~frame["is_baseline"]]
    if log_y:
        q = q[q["dnll"] > 0]
    if q.empty:
        raise AnalysisError(f"no quantized rows to plot {y} against parameters")
    q = q.assign(_group=q["format.family"].map(FORMAT_GROUPS).fillna(q["format.family"]))
    col_key, color_key, style_key = _facets(q)
    cols = sorted(q[col_key].unique())
    rows, notes = panels(q, min_sizes=2)
    if not rows:
        raise AnalysisError("every (corpus, family) has one model size: " + "; ".join(notes))
    fig, axes = _grid(len(rows), len(cols), sharey="row")
    colors = {c: {v: COLORS[i % 10] for i, v in enumerate(sorted(q.loc[q[col_key] == c,
                                                                       color_key].unique()))}
              for c in cols}
    styles = {m: LINESTYLES[i % 4] for i, m in enumerate(sorted(q["method.name"].unique()))}
    for r, (where, part) in enumerate(rows):
        # the full-precision NLL of each model of this slice (what every job's dNLL is from)
        base = part.drop_duplicates("model.name").sort_values(size_column)
        for c, col in enumerate(cols):
            ax = axes[r, c]
            ax.set_gid(_gid(where))
            if not log_y:
                ax.plot(base[size_column], base["metrics.nll_fp"], color="k", lw=2,
                        label="full precision",
                        gid="reference")
            for (fmt, method), g in part[part[col_key] == col].groupby(["format.name",
                                                                         "method.name"]):
                g = g.sort_values(size_column)
                ck = fmt if color_key == "format.name" else method
                i = list(colors[col]).index(ck)
                ax.plot(g[size_column], g[y], color=colors[col][ck], marker=MARKERS[i % 11],
                        ms=4, lw=1.2, ls=styles[method] if style_key else "-",
                        label=f"{fmt} / {method}", gid=f"format.name={fmt}|method.name={method}")
            ax.set(xscale="log", yscale="log" if log_y else "linear",
                   title=f"{_title(where)} — {col}", xlabel=f"parameters ({size_column})")
            ax.title.set_fontsize(9)
            if c == 0:
                ax.set_ylabel("dNLL (nats)" if log_y else "NLL (nats)")
            ax.grid(alpha=0.3, which="both" if log_y else "major")
            if r == 0:
                _legend(ax, colors[col], styles if style_key else {}, not log_y)
    _note(fig, notes)
    fig.tight_layout(rect=(0, 0.02 if notes else 0, 1, 1))
    return fig


def _legend(ax, colors: dict, styles: dict, with_base: bool) -> None:
    handles = [Line2D([], [], color="k", lw=2, label="full precision")] if with_base else []
    handles += [Line2D([], [], color=col, marker=MARKERS[i % 11], ms=4, label=name)
                for i, (name, col) in enumerate(colors.items())]
    handles += [Line2D([], [], color="0.3", ls=ls, label=m) for m, ls in styles.items()]
    ax.legend(handles=handles, fontsize=7, ncol=2 if len(handles) > 6 else 1, framealpha=0.85)


def plot_activation_schemes(frame: pd.DataFrame, y: str = "metrics.nll",
                            size_column: str = "params.total") -> Figure:
    """Weight x activation studies: ``y`` against parameters, a row per (corpus, family), a
    column per weight / activation format pair, one line per scheme (method, granularity,
    alpha); the full-precision NLL dashed black."""
    if y not in frame:
        raise AnalysisError(f"the records have no {y}")
    q = frame[frame["activations"] != "none"]
    if y == "dnll":
        q = q[q["dnll"] > 0]
    if q.empty or y not in q:
        raise AnalysisError(f"no activation-quantized rows with {y} to plot")
    q = q.assign(_wa="W " + q["format.name"] + " / A " + q["method.activations.format"].astype(str),
                 _scheme=q["method.name"] + " " + q["activations"].str.split(" ", n=1).str[1])
    cols = sorted(q["_wa"].unique())
    schemes = sorted(q["_scheme"].unique())
    colors = {s: COLORS[i % 10] for i, s in enumerate(schemes)}
    rows, notes = panels(q, min_sizes=2)
    if not rows:
        raise AnalysisError("every (corpus, family) has one model size: " + "; ".join(notes))
    fig, axes = _grid(len(rows), len(cols), sharey="row" if y == "metrics.nll" else False)
    for r, (where, part) in enumerate(rows):
        for c, col in enumerate(cols):
            ax = axes[r, c]
            ax.set_gid(_gid(where))
            sub = part[part["_wa"] == col]
            if y == "metrics.nll" and len(sub):
                fp = sub.drop_duplicates("model.name").sort_values(size_column)
                ax.plot(fp[size_column], fp["metrics.nll_fp"], "k--", lw=1.5, gid="reference")
            for (scheme, act, fmt, method), g in sub.groupby(
                    ["_scheme", "activations", "format.name", "method.name"]):
                g = g.sort_values(size_column)
                i = schemes.index(scheme)
                ax.plot(g[size_column], g[y], color=colors[scheme], marker=MARKERS[i % 11],
                        ms=4, lw=1.2,
                        gid=f"activations={act}|format.name={fmt}|method.name={method}")
            ax.set(xscale="log", yscale="log" if y == "dnll" else "linear",
                   title=f"{_title(where)} — {col}", xlabel=f"parameters ({size_column})")
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel({"metrics.nll": "NLL (nats)", "dnll": "dNLL (nats)"}.get(
                    y, y.rpartition(".")[2].replace("_", " ")))
    handles = [Line2D([], [], color=colors[s], marker=MARKERS[i % 11], ms=4, label=s)
               for i, s in enumerate(schemes)]
    if y == "metrics.nll":
        handles.append(Line2D([], [], color="k", ls="--", label="full precision"))
    ncol = min(len(handles), 4)
    bottom = (0.5 + 0.18 * -(-len(handles) // ncol)) / fig.get_figheight()  # inches -> fraction
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.12 / fig.get_figheight()))
    _note(fig, notes)
    return fig


def plot_dnll_vs_sqnr(frame: pd.DataFrame, fits: StudyFits | None = None,
                      size_column: str = "params.blocks") -> Figure:
    """dNLL against weight SQNR, a row per (corpus, family), a column per method, coloured by
    size, with that slice's fitted noise law per size."""
    q = frame[~frame["is_baseline"] & (frame["dnll"] > 0)]
    if q.empty or SQNR_COLUMN not in q:
        raise AnalysisError("no quantized rows with positive dNLL and weight SQNR to plot")
    rows, notes = panels(q)
    methods = sorted(q["method.name"].unique())
    fig, axes = _grid(len(rows), len(methods), width=4.2, sharey="row")
    for r, (where, part) in enumerate(rows):
        sizes = sorted(part[size_column].unique())
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
        for c, method in enumerate(methods):
            ax = axes[r, c]
            ax.set_gid(_gid(where))
            sub = part[part["method.name"] == method]
            fit = fits.get("noise", **where, **{"method.name": method}) if fits else None
            if sub.empty:
                continue
            grid = np.linspace(sub[SQNR_COLUMN].min() - 2, sub[SQNR_COLUMN].max() + 2, 50)
            for n, color in zip(sizes, colors):
                g = sub[sub[size_column] == n]
                ax.scatter(g[SQNR_COLUMN], g["dnll"], color=color, s=12, label=f"N={n:.3g}")
                if fit is not None and len(g):
                    ax.plot(grid, fit.predict(n=n, sqnr=grid), color=color, lw=1)
            ax.set(yscale="log", xlabel="weight SQNR (dB)",
                   title=f"{_title(where)} — {method}" + (" (lines: noise law)" if fit else ""))
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel("dNLL (nats)")
                ax.legend(fontsize=6, ncol=2)
    _note(fig, notes)
    fig.tight_layout()
    return fig


def plot_predicted_vs_measured(predictions: pd.DataFrame,
                               models: tuple[str, ...] = ("forest", "noise")) -> Figure:
    """Out-of-fold predicted dNLL against measured, for the forest and a law (log axes)."""
    fig, axes = _grid(1, 1, width=5.0, height=4.2)
    ax = axes[0, 0]
    y = predictions["measured"]
    for i, m in enumerate(models):
        if m in predictions and predictions[m].notna().any():
            ax.scatter(y, predictions[m], s=10, alpha=0.6, marker=MARKERS[i], label=m)
    pos = y[y > 0]
    lims = [pos.min() / 2, pos.max() * 2] if len(pos) else [1e-4, 1]
    ax.plot(lims, lims, "k--", lw=1, label="y = x")
    ax.set(xscale="log", yscale="log", xlabel="measured dNLL", ylabel="predicted dNLL",
           title="held-out predictions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_pareto(frame: pd.DataFrame) -> Figure:
    """Model bytes against NLL, a panel per (corpus, family): every record in grey, that
    panel's Pareto frontier in red with its points coloured by format, and the points where
    the frontier moves to a larger model labelled in a column at the right (ordered as the
    points, so neither labels nor leader lines cross; the report's table lists every point)."""
    from ptqscale_analysis.queries import pareto_frontier

    rows, _ = panels(frame)
    formats = sorted(frame["format.name"].unique())
    ncols = 1 if len(rows) == 1 else 2
    nrows = -(-len(rows) // ncols)
    fig, axes = _grid(nrows, ncols, width=7.0, height=4.2)
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    for (where, part), ax in zip(rows, axes.flat):
        ax.set_gid(_gid(where))
        front = pareto_frontier(part)
        ax.scatter(part["model_bytes"], part["metrics.nll"], s=8, color="0.8", label="records")
        ax.plot(front["model_bytes"], front["metrics.nll"], "-", color="C3", lw=1,
                label="Pareto frontier")
        for fmt, g in front.groupby("format.name"):
            i = formats.index(fmt)  # one colour and marker per format in every panel
            ax.plot(g["model_bytes"], g["metrics.nll"], ls="none", marker=MARKERS[i % 11],
                    color=COLORS[i % 10], ms=5, label=fmt)
        ax.set(xscale="log", xlabel="model bytes", ylabel="NLL (nats)", title=_title(where))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper right", ncol=2)
        keep = frontier_labels(front)
        label_column(ax, front["model_bytes"].to_numpy(float)[keep],
                     front["metrics.nll"].to_numpy(float)[keep],
                     [f"{r['model.size']} {r['format.name']} {r['method.name']}"
                      for _, r in front.iloc[keep].iterrows()])
    fig.tight_layout()
    return fig


def frontier_labels(front: pd.DataFrame, most: int = 14) -> np.ndarray:
    """Positions of the frontier points worth a label: where the model changes (its first,
    cheapest point) and the last point; at most ``most``, evenly thinned."""
    model = front["model.name"].to_numpy()
    keep = [i for i in range(len(model)) if i == 0 or model[i] != model[i - 1]]
    keep = sorted(set(keep) | {len(model) - 1})
    if len(keep) > most:
        keep = [keep[int(round(j))] for j in np.linspace(0, len(keep) - 1, most)]
    return np.array(keep, dtype=int)


def label_column(ax, x: np.ndarray, y: np.ndarray, texts: list[str], fontsize: float = 7):
    """Label points in a column right of ``ax``: spread in y so no two labels overlap, joined
    to their points by leader lines. Returns the annotations."""
    ax.figure.canvas.draw()  # limits are final
    to_axes = ax.transAxes.inverted()
    frac = to_axes.transform(ax.transData.transform(np.c_[x, y]))[:, 1]
    height_pt = ax.get_window_extent().height * 72 / ax.figure.dpi
    gap = 1.35 * fontsize / height_pt
    order = np.argsort(-frac)
    pos = np.clip(frac[order], 0, 1)
    for i in range(1, len(pos)):  # push down below the label above
        pos[i] = min(pos[i], pos[i - 1] - gap)
    shift = max(0.0, -pos[-1]) if len(pos) else 0.0
    pos = pos + shift  # ran off the bottom: lift the column, then pull the top back down
    for i in range(len(pos) - 2, -1, -1):
        pos[i] = max(pos[i], pos[i + 1] + gap)
    out = []
    for j, p in zip(order, pos):
        out.append(ax.annotate(texts[j], xy=(x[j], y[j]), xycoords="data", xytext=(1.03, p),
                               textcoords="axes fraction", fontsize=fontsize, va="center",
                               arrowprops=dict(arrowstyle="-", lw=0.5, color="0.55",
                                               shrinkA=0, shrinkB=2)))
    return out


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
    """dNLL under Gaussian weight noise against its SQNR, a panel per (corpus, family), one
    curve per model (the landscape is measured per model and corpus)."""
    cols = noise_response_columns(frame)
    if not cols:
        raise AnalysisError("no noise-response features (landscape.dnll_at_<s>db) in the "
                            "records; measure the landscape to get this figure")
    rows, _ = panels(frame)
    fig, axes = _grid(1, len(rows), width=4.2, height=3.6, sharey=True)
    for (where, part), ax in zip(rows, axes[0]):
        ax.set_gid(_gid(where))
        models = part.drop_duplicates("model.name").sort_values("params.total")
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(models)))
        for color, (_, m) in zip(colors, models.iterrows()):
            levels = [s for s, c in cols.items() if pd.notna(m.get(c))]
            if levels:
                ax.plot(levels, [m[cols[s]] for s in levels], "o-", ms=3, color=color,
                        label=m["model.name"])
        ax.set(yscale="log", xlabel="noise SQNR (dB)", title=_title(where))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("dNLL (nats)")
    fig.tight_layout()
    return fig
