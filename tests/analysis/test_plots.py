"""Figures on the committed studies: every line stays inside one corpus, family and scheme;
legends never repeat a style; Pareto labels never overlap."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from ptqscale_analysis import plots
from ptqscale_analysis.load import load_study, weight_only

RESULTS = Path(__file__).resolve().parents[2] / "results"


@pytest.fixture(scope="module")
def family_scan():
    return weight_only(load_study(RESULTS, "family_scan"))


@pytest.fixture(scope="module")
def crossquant():
    return load_study(RESULTS, "crossquant")


def _slice(frame, gid):
    """The rows named by a gid (``data.name=...|model.family=...``)."""
    assert gid, "every panel and every line names its slice"
    for part in gid.split("|"):
        key, _, value = part.partition("=")
        frame = frame[frame[key].astype(str) == value]
    assert len(frame), gid
    return frame


def _points(rows, x, y) -> set:
    return set(zip(np.round(rows[x].to_numpy(float), 6), np.round(rows[y].to_numpy(float), 9)))


def _check_lines(fig, frame, x, y) -> int:
    """Each line is exactly the series of its panel's slice x its own slice (format, method,
    activation scheme): the records of one corpus and family, one point per size, in order."""
    n_lines = 0
    for ax in fig.axes:
        if not ax.get_gid():
            continue
        rows = _slice(frame, ax.get_gid())
        for line in ax.get_lines():
            if line.get_gid() == "reference":  # full precision: one point per model of the slice
                xs, ys = (np.asarray(v, float) for v in line.get_data())
                fp = rows.drop_duplicates("model.name").sort_values(x)
                np.testing.assert_allclose(xs, fp[x].to_numpy(float))
                np.testing.assert_allclose(ys, fp["metrics.nll_fp"].to_numpy(float))
                continue
            series = _slice(rows, line.get_gid()).sort_values(x)
            xs, ys = (np.asarray(v, float) for v in line.get_data())
            np.testing.assert_allclose(xs, series[x].to_numpy(float))
            np.testing.assert_allclose(ys, series[y].to_numpy(float))
            assert np.all(np.diff(xs) > 0), "one point per size"
            assert series["data.name"].nunique() == 1 and series["model.family"].nunique() == 1
            n_lines += 1
    return n_lines


def _styles_unique(ax):
    legend = ax.get_legend()
    if legend is None:
        return
    styles = [(tuple(np.round(h.get_color() if isinstance(h.get_color(), tuple)
                              else plt.matplotlib.colors.to_rgb(h.get_color()), 3)),
               h.get_marker(), h.get_linestyle()) for h in legend.legend_handles]
    assert len(styles) == len(set(styles)), "two legend entries look alike"


def test_nll_vs_params_never_crosses_corpora(family_scan):
    fig = plots.plot_nll_vs_params(family_scan)
    # 2 corpora x 1 family with >= 2 sizes, x 3 format families
    assert len([ax for ax in fig.axes if ax.get_gid()]) == 6
    n = _check_lines(fig, family_scan, "params.total", "metrics.nll")
    assert n == 2 * 12 * 2  # per corpus: 12 formats x 2 methods (+ the full-precision reference)
    for ax in fig.axes:
        _styles_unique(ax)
        assert len(ax.get_legend().texts) <= 12 if ax.get_legend() else True
    plt.close(fig)


def test_activation_figure_never_crosses_schemes(crossquant):
    fig = plots.plot_activation_schemes(crossquant)
    q = crossquant[crossquant["activations"] != "none"]
    # gutenberg-llama only (stories260K: one size); 7 schemes in each of W4A4, W4A8, W8A8
    assert _check_lines(fig, q, "params.total", "metrics.nll") == 3 * 7
    plt.close(fig)


def test_pareto_is_per_corpus_with_labels_that_do_not_overlap(family_scan):
    fig = plots.plot_pareto(family_scan)
    panels = [ax for ax in fig.axes if ax.get_gid()]
    assert len(panels) == 4  # 2 corpora x 2 families (tokenizers)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in panels:
        rows = _slice(family_scan, ax.get_gid())
        front = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto frontier"][0]
        pts = set(zip(*(np.round(np.asarray(v, float), 6) for v in front.get_data())))
        assert pts <= set(zip(np.round(rows["model_bytes"], 6), np.round(rows["metrics.nll"], 6)))
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        assert len(boxes) >= 2
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), "two frontier labels overlap"
    plt.close(fig)


def test_label_column_spreads_crowded_points():
    fig, ax = plt.subplots(figsize=(4, 3))
    x, y = np.arange(10.0), np.full(10, 1.0) + np.arange(10) * 1e-4  # all at one height
    ax.plot(x, y)
    texts = plots.label_column(ax, x, y, [f"point {i}" for i in range(10)])
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


def test_dnll_vs_sqnr_panels_hold_one_slice(family_scan):
    fig = plots.plot_dnll_vs_sqnr(family_scan)
    for ax in fig.axes:
        if not ax.get_gid():
            continue
        rows = _slice(family_scan, ax.get_gid())
        allowed = _points(rows, "metrics.weight_sqnr_db", "dnll")
        for coll in ax.collections:
            pts = {(round(a, 6), round(b, 9)) for a, b in coll.get_offsets()}
            assert pts <= allowed
    plt.close(fig)
