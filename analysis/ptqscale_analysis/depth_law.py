"""The precision law with a training-tokens term, fitted on a study's D axis (issue 22).

    dNLL = C * N^-gamma_N * D^gamma_D * exp(-P / gamma_P)

``N`` parameters in the blocks, ``D`` the tokens a checkpoint was trained on, ``P``
effective bits per weight: Kumar et al. 2024 ("Scaling Laws for Precision") post-training
term, whose D exponent is positive there (more training, more PTQ damage; Ouyang et al.
2024 see the same for low-bit RTN). ``D`` is read from the record's ``model.revision``
(``x0.25`` .. ``x4``: multiples of the family's base token count, conf/zoo): a base count
only rescales ``C``, so ``gamma_D`` does not depend on it.

Besides the law, :func:`depth_slopes` gives the model-free view: per (model, data, format,
method) the least-squares slope of log dNLL over log D, i.e. the local exponent at fixed N.

Example::

    >>> fit = fit_depth_law(load_study("results", "zoo_depth"))     # doctest: +SKIP
    >>> fit.params["gamma_D"], fit.ci["gamma_D"]                   # doctest: +SKIP
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.laws import _LOG_CONST, FitConfig, LawFit, LawSpec, _fit, _inputs
from ptqscale_analysis.load import weight_only

_REVISION = re.compile(r"^x([0-9]*\.?[0-9]+)$")
_GAMMA = (-3.0, 5.0)


def log_depth(theta, X):
    log_c, gamma_n, gamma_d, log_gamma_p = theta
    return (log_c - gamma_n * np.log(X["n"]) + gamma_d * np.log(X["d"])
            - X["bits"] / np.exp(log_gamma_p))


def jac_depth(theta, X):
    return np.stack([np.ones_like(X["n"]), -np.log(X["n"]), np.log(X["d"]),
                     X["bits"] / np.exp(theta[3])], axis=1)


DEPTH = LawSpec("precision_d", "dNLL = C * N^-gamma_N * D^gamma_D * exp(-P / gamma_P)",
                ("C", "gamma_N", "gamma_D", "gamma_P"), log_depth, jac_depth,
                lambda t: np.array([np.exp(t[0]), t[1], t[2], np.exp(t[3])]),
                (_LOG_CONST, _GAMMA, _GAMMA, (np.log(0.05), np.log(100.0))))


def tokens_multiple(revision: pd.Series) -> pd.Series:
    """``x0.25`` -> 0.25: the revision as a multiple of the family's base token count."""
    def one(value) -> float:
        m = _REVISION.match(str(value))
        if not m:
            raise AnalysisError(f"model.revision {value!r} is not a training-length revision "
                                "'x<multiple>' (the zoo's x0.25..x4); the D law needs one per row")
        return float(m.group(1))
    return revision.map(one).astype(float)


def depth_rows(frame: pd.DataFrame, size_column: str = "params.blocks",
               min_dnll: float = 0.0) -> pd.DataFrame:
    """Weight-only quantized rows with ``n``, ``d`` (multiple of base tokens), ``bits`` and
    dNLL > ``min_dnll`` (log space)."""
    if "model.revision" not in frame:
        raise AnalysisError("the records have no model.revision: the D law needs a study over "
                            "training lengths (e.g. sweeps/zoo_depth.yaml)")
    rows = weight_only(frame)
    rows = rows[~rows["is_baseline"] & rows["dnll"].notna()].copy()
    rows["d"] = tokens_multiple(rows["model.revision"])
    rows["n"] = pd.to_numeric(rows[size_column], errors="coerce")
    rows["bits"] = pd.to_numeric(rows["bits_per_weight"], errors="coerce")
    return rows[rows["dnll"] > min_dnll]


def fit_depth_law(frame: pd.DataFrame, cfg: FitConfig | None = None,
                  size_column: str = "params.blocks", min_dnll: float = 0.0) -> LawFit:
    """Fit the D law on every quantized row of ``frame`` (pooled over families and formats)."""
    rows = depth_rows(frame, size_column, min_dnll)
    if rows["d"].nunique() < 2:
        raise AnalysisError(f"the D law needs >= 2 training lengths, got "
                            f"{sorted(rows['d'].unique())}")
    if rows["bits"].nunique() < 2:
        raise AnalysisError("the D law needs >= 2 distinct effective bit widths")
    X, y = _inputs(DEPTH, {k: rows[k].to_numpy(float) for k in ("n", "d", "bits")},
                   rows["dnll"].to_numpy(float), min_sizes=2)
    A = np.column_stack([np.ones_like(y), -np.log(X["n"]), np.log(X["d"])])
    starts = []
    for gamma_p in (0.5, 1.0, 2.0):   # linear least squares at each gamma_P as the start
        coef, *_ = np.linalg.lstsq(A, np.log(y) + X["bits"] / gamma_p, rcond=None)
        starts.append(np.array([coef[0], coef[1], coef[2], np.log(gamma_p)]))
    return _fit(DEPTH, X, y, starts, cfg or FitConfig())


def depth_verdict(fit: LawFit) -> str:
    """One sentence: does damage at fixed N grow with D, by the interval of gamma_D?"""
    g, (lo, hi) = fit.params["gamma_D"], fit.ci["gamma_D"]
    if not np.isfinite(lo):
        return f"gamma_D = {g:.3f} (no interval: fitted without bootstrap)"
    if lo > 0:
        word = "grows"
    elif hi < 0:
        word = "shrinks"
    else:
        word = "shows no significant trend"
    return (f"at fixed N, PTQ damage {word} with training tokens: gamma_D = {g:.3f} "
            f"[{lo:.3f}, {hi:.3f}] (dNLL ~ D^gamma_D)")


def depth_slopes(frame: pd.DataFrame, min_dnll: float = 0.0) -> pd.DataFrame:
    """Per (model, data, format, method): slope of log dNLL over log D (>= 3 revisions)."""
    rows = depth_rows(frame, min_dnll=min_dnll)
    keys = [k for k in ("model.family", "model.size", "data.name", "format.name", "method.name")
            if k in rows]
    out = []
    for key, g in rows.groupby(keys):
        if g["d"].nunique() >= 3:
            slope = np.polyfit(np.log(g["d"]), np.log(g["dnll"]), 1)[0]
            out.append({**dict(zip(keys, key)), "revisions": int(g["d"].nunique()),
                        "slope": float(slope)})
    return pd.DataFrame(out)
