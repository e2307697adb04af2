"""Fit every law of :mod:`ptqscale_analysis.laws` to a study's frame, group by group.

A law that cannot be fitted for a group (too few sizes, one bit width, no positive dNLL)
is skipped with a note saying why, so one thin corner of a study never hides the rest.

The quantity the damage laws describe is ``StudyFitConfig.target``: ``dnll`` by default, or
the damage to any measured field (:func:`ptqscale_analysis.load.add_target`), e.g.
``target="task.ptq_gutenberg_cloze.acc"`` (accuracy lost) or ``target="kl_mean"``: the laws'
forms are the same with dNLL read as that damage. The full-precision law is NLL's only.

Example::

    >>> fits = fit_study_laws(load_study("results", "quickstart"))   # doctest: +SKIP
    >>> print(fits.table())                                           # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.laws import (
    FitConfig,
    LawFit,
    fit_format_power_law,
    fit_fp_law,
    fit_noise_law,
    fit_noise_law_saturating,
    fit_precision_law,
)
from ptqscale_analysis.load import Target, add_target

SQNR_COLUMN = "metrics.weight_sqnr_db"


@dataclass(frozen=True)
class StudyFitConfig:
    """Which columns feed the laws and how rows are grouped.

    ``size_column`` is N (parameters in the transformer blocks by default: the
    non-embedding count of Kaplan et al. 2020, the same for every format of a model).
    Rows with ``dnll <= min_dnll`` (the target's damage, for another ``target``) cannot enter
    a log-space fit and are dropped (counted).
    """

    size_column: str = "params.blocks"
    # Groups that get their own fit; columns a study lacks are skipped (one corpus, say).
    group_by: tuple[str, ...] = ("model.family", "data.name", "method.name")
    min_dnll: float = 0.0
    fit: FitConfig = field(default_factory=FitConfig)
    target: str = "dnll"   # what the damage laws fit (module docstring)

    def __post_init__(self):
        if not self.group_by:
            raise AnalysisError("group_by needs at least one column (e.g. 'method.name')")


@dataclass
class GroupFit:
    law: str
    group: dict[str, str]
    fit: LawFit


@dataclass
class StudyFits:
    fits: list[GroupFit]
    notes: list[str]
    target: Target | None = None

    def table(self) -> pd.DataFrame:
        """One row per (law, group, parameter) with value, interval, convergence and n."""
        rows = []
        for g in self.fits:
            for name, value in g.fit.params.items():
                lo, hi = g.fit.ci[name]
                rows.append({"law": g.law, "group": _label(g.group), "param": name,
                             "value": value, "ci_low": lo, "ci_high": hi,
                             "converged": g.fit.converged, "n": g.fit.n})
        return pd.DataFrame(rows, columns=["law", "group", "param", "value", "ci_low",
                                           "ci_high", "converged", "n"])

    def get(self, law: str, **group: str) -> LawFit | None:
        """The fit of ``law`` for the group whose keys match ``group`` (first match)."""
        for g in self.fits:
            if g.law == law and all(g.group.get(k) == v for k, v in group.items()):
                return g.fit
        return None


def _label(group: dict) -> str:
    """{"model.family": "zoo", "method.name": "rtn"} -> "family=zoo, method=rtn"."""
    def short(key: str) -> str:
        head, _, tail = key.rpartition(".")
        return head.rpartition(".")[2] if tail == "name" and head else tail
    return ", ".join(f"{short(k)}={v}" for k, v in group.items())


def size_values(frame: pd.DataFrame, column: str) -> np.ndarray:
    """N per row from ``column``, with a clear error when the records lack it."""
    if column not in frame:
        have = [c for c in frame.columns if c.startswith("params.")]
        raise AnalysisError(f"size column {column!r} is not in the records; have {have}")
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(float)
    if np.isnan(values).any():
        raise AnalysisError(f"size column {column!r} is missing in some records")
    return values


def quantized_rows(frame: pd.DataFrame, cfg: StudyFitConfig,
                   target: Target | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Quantized rows whose target damage (dNLL by default) can enter a log-space fit, and
    notes on what was dropped (``frame`` holds the target's columns: :func:`add_target`)."""
    target = target or add_target(frame, "dnll")[1]
    q = frame[~frame["is_baseline"]]
    damage = q[target.column]
    notes = []
    unknown = damage.isna()
    if unknown.any():
        notes.append(f"{int(unknown.sum())} of {len(q)} quantized rows have no {target.label} "
                     f"(no full-precision {target.source} of their model: run method=none) "
                     "and are left out")
    keep = damage > cfg.min_dnll
    if (~keep & ~unknown).any():
        notes.append(f"{int((~keep & ~unknown).sum())} of {len(q)} quantized rows have "
                     f"{target.label} <= {cfg.min_dnll:g} and are left out of the damage laws")
    return q[keep], notes


ALL_LAWS = ("fp", "noise", "noise_saturating", "precision", "format_power")


def fit_study_laws(frame: pd.DataFrame, cfg: StudyFitConfig | None = None,
                   laws: tuple[str, ...] = ALL_LAWS) -> StudyFits:
    """Every law in ``laws`` for every group of ``frame`` (a :func:`load_study` frame)."""
    cfg = cfg or StudyFitConfig()
    unknown = set(laws) - set(ALL_LAWS)
    if unknown:
        raise AnalysisError(f"unknown laws {sorted(unknown)}; known: {list(ALL_LAWS)}")
    size_values(frame, cfg.size_column)  # fail early on a missing size column
    frame, target = add_target(frame, cfg.target)
    out = StudyFits([], [], target)
    if "fp" in laws and target.name == "dnll":
        _fit_fp(frame, cfg, out)
    elif "fp" in laws:
        out.notes.append(f"fp law: fitted to the NLL only (target {target.name})")
    q, notes = quantized_rows(frame, cfg, target)
    out.notes += notes
    by = [c for c in cfg.group_by if c in q]
    for key, rows in q.groupby(by, sort=True):
        group = dict(zip(by, np.atleast_1d(key)))
        n = np.unique(size_values(rows, cfg.size_column))
        if len(n) < 2:  # one note, not one per law and format
            out.notes.append(f"[{_label(group)}] one model size ({n.tolist()}): no size law")
            continue
        _fit_dnll_laws(rows, group, cfg, out, laws, target.column)
    return out


def _try(out: StudyFits, law: str, group: dict, fn, *args) -> None:
    try:
        fit = fn(*args)
    except AnalysisError as e:
        out.notes.append(f"{law} law [{_label(group)}] skipped: {e}")
        return
    out.fits.append(GroupFit(law, group, fit))
    out.notes += [f"{law} law [{_label(group)}]: {n}" for n in fit.notes]


def _fit_fp(frame: pd.DataFrame, cfg: StudyFitConfig, out: StudyFits) -> None:
    # one full-precision NLL per model and corpus: NLLs of different corpora never mix
    by = [c for c in ("model.family", "data.name") if c in frame]
    models = frame.drop_duplicates(["model.name", *by[1:]])
    for key, rows in models.groupby(by, sort=True):
        n = size_values(rows, cfg.size_column)
        _try(out, "fp", dict(zip(by, np.atleast_1d(key))), fit_fp_law, n,
             rows["metrics.nll_fp"].to_numpy(float), cfg.fit)


def _fit_dnll_laws(rows: pd.DataFrame, group: dict, cfg: StudyFitConfig, out: StudyFits,
                   laws: tuple[str, ...], column: str = "dnll") -> None:
    n, dnll = size_values(rows, cfg.size_column), rows[column].to_numpy(float)
    noise_laws = {"noise": fit_noise_law, "noise_saturating": fit_noise_law_saturating}
    for law, fn in noise_laws.items():
        if law not in laws:
            continue
        if SQNR_COLUMN in rows and rows[SQNR_COLUMN].notna().all():
            _try(out, law, group, fn, n, rows[SQNR_COLUMN].to_numpy(float), dnll, cfg.fit)
        else:
            out.notes.append(f"{law} law [{_label(group)}] skipped: {SQNR_COLUMN} missing")
    if "precision" in laws:
        _try(out, "precision", group, fit_precision_law, n, rows["bits_per_weight"], dnll,
             cfg.fit)
    if "format_power" not in laws:
        return
    for fmt, sub in rows.groupby("format.name", sort=True):
        _try(out, "format_power", {**group, "format.name": fmt}, fit_format_power_law,
             size_values(sub, cfg.size_column), sub[column].to_numpy(float), cfg.fit)


# ---- laws as predictors, for cross-validation next to the forest ------------------------

LAW_PREDICTORS = ("noise", "precision", "format_power")


def law_predictions(train: pd.DataFrame, test: pd.DataFrame,
                    cfg: StudyFitConfig) -> dict[str, np.ndarray]:
    """The target damage (dNLL by default) of ``test`` rows from laws fitted on ``train``
    (NaN where a law cannot say).

    Laws are pooled over families (group by method only), so a held-out family or size
    can still be predicted; no bootstrap is needed for point predictions.
    """
    cfg = StudyFitConfig(cfg.size_column, ("method.name",), cfg.min_dnll,
                         FitConfig(**{**cfg.fit.__dict__, "n_boot": 0}), cfg.target)
    fits = fit_study_laws(train, cfg, LAW_PREDICTORS)
    preds = {law: np.full(len(test), np.nan) for law in LAW_PREDICTORS}
    n = size_values(test, cfg.size_column)
    for i, row in enumerate(test.itertuples(index=False)):
        r = dict(zip(test.columns, row))
        method = r["method.name"]
        inputs = {"noise": {"n": n[i], "sqnr": r.get(SQNR_COLUMN, np.nan)},
                  "precision": {"n": n[i], "bits": r["bits_per_weight"]},
                  "format_power": {"n": n[i]}}
        for law in LAW_PREDICTORS:
            extra = {"format.name": r["format.name"]} if law == "format_power" else {}
            fit = fits.get(law, **{"method.name": method}, **extra)
            if fit is not None and np.all(np.isfinite(list(inputs[law].values()))):
                preds[law][i] = float(fit.predict(**inputs[law]))
    return preds
