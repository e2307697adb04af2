"""The ``pareto`` question of the guided design (:mod:`ptqscale_analysis.active`): the measured
frontier of memory (``model_bytes``) against NLL per corpus and family, and the expected
improvement of a point not yet run over it; plus the forest's out-of-bag error model that
widens the trees' spread there, and a second opinion on dNLL from the grid itself
(:func:`rank1_dnll`: model sensitivity x format damage) that the trees cannot give.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy.stats import norm

from ptqscale_analysis.predictor import add_features, training_rows


def nan_reduce(fn, trees: np.ndarray, **kw) -> np.ndarray:
    """``fn`` over the trees per point; NaN, silently, for points no tree can predict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(trees, axis=0, **kw)


def oob_error(pred, frame: pd.DataFrame) -> tuple[float, float]:
    """(a, b): the forest's out-of-bag absolute error as a + b * |prediction| (least squares,
    clipped at 0), each training row predicted by the trees that did not see it. The spread
    of the trees alone is overconfident where records are few (a 3-bit format seen only on
    the smallest models), and errors grow with the damage, so the pareto score adds this."""
    rows = training_rows(frame)
    X = add_features(rows, pred.methods)[pred.features].to_numpy(float)
    y = rows["dnll"].to_numpy(float)
    total, count = np.zeros(len(y)), np.zeros(len(y))
    for tree, seen in zip(pred.forest.estimators_, pred.forest.estimators_samples_):
        out = np.ones(len(y), bool)
        out[seen] = False
        if out.any():
            total[out] += tree.predict(X[out])
            count[out] += 1
    ok = count > 0
    if ok.sum() < 3:
        return math.nan, math.nan
    p = total[ok] / count[ok]
    A = np.c_[np.ones(ok.sum()), np.abs(p)]
    a, b = np.linalg.lstsq(A, np.abs(p - y[ok]), rcond=None)[0]
    return max(float(a), 0.0), max(float(b), 0.0)


def groups(t: pd.DataFrame) -> list[str]:
    return [c for c in ("data.name", "model.family") if c in t]


def measured_frontier(t: pd.DataFrame) -> list[int]:
    """Ids of the measured points (baselines included) that no other measured point of
    their corpus and family beats on both bytes and NLL."""
    known = t[t["measured"] & t["nll"].notna() & t["model_bytes"].notna()]
    out: list[int] = []
    for _, g in known.groupby(groups(t), sort=True):
        g = g.iloc[np.lexsort((g["nll"].to_numpy(), g["model_bytes"].to_numpy()))]
        best = np.minimum.accumulate(g["nll"].to_numpy())
        keep = np.r_[True, g["nll"].to_numpy()[1:] < best[:-1]]
        out += [int(i) for i in g.index[keep]]
    return sorted(out)


RANK1_ITERS = 50      # alternating least squares sweeps (family_scan: 400 move the mean 1e-4)
RANK1_RIDGE = 1e-4    # nats^2: shrinks a factor seen only where dNLL ~ 0 (8-bit) to 0
RANK1_PRIOR = 3       # points' worth of the pooled residual variance in a unit's own


def rank1_dnll(t: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """dNLL of every grid point as ``s[unit] * g[config]`` (unit: model and corpus; config:
    format and method), fitted by alternating least squares to the measured quantized points,
    and the residual variance of the point's unit (shrunk towards the pooled one by
    ``RANK1_PRIOR`` points). NaN where the unit or the config has nothing measured.

    Why: the forest predicts from features and cannot extrapolate in size (a 20M model's
    3-bit GPTQ is predicted at the damage of the largest size it has seen), so the frontier's
    low end of every larger model looks hopeless to it. One job of a model fixes that model's
    sensitivity ``s`` here, and ``g`` comes from every model's jobs in that format. Where the
    product law fails (a corpus the calibration did not come from: RTN beats GPTQ there in 9 of
    18 damaged cells of the 200k-1m members of family_scan) the unit's residuals are large and
    so is its uncertainty. With a screen (a ``screen_dnll`` column), the product describes
    what the screen misses, ``dNLL - screen_dnll``, and the screen is added back."""
    n = len(t)
    offset = t["screen_dnll"].fillna(0.0).to_numpy(float) if "screen_dnll" in t else np.zeros(n)
    unit = pd.factorize(t[[c for c in ("model.name", "data.name") if c in t]]
                        .astype(str).agg("|".join, axis=1))[0]
    cfg = pd.factorize(t[["format.name", "method.name"]].astype(str).agg("|".join, axis=1))[0]
    obs = (t["measured"] & ~t["baseline"] & t["dnll"].notna()).to_numpy()
    pred, var = np.full(n, np.nan), np.full(n, np.nan)
    if obs.sum() < 3:
        return pred, var
    ou, oc, y = unit[obs], cfg[obs], (t["dnll"].to_numpy(float) - offset)[obs]
    nu, nc = unit.max() + 1, cfg.max() + 1
    s, g = np.ones(nu), np.zeros(nc)
    for _ in range(RANK1_ITERS):
        g = np.bincount(oc, s[ou] * y, nc) / (np.bincount(oc, s[ou] ** 2, nc) + RANK1_RIDGE)
        s = np.bincount(ou, g[oc] * y, nu) / (np.bincount(ou, g[oc] ** 2, nu) + RANK1_RIDGE)
    r2 = (y - s[ou] * g[oc]) ** 2
    unit_var = (np.bincount(ou, r2, nu) + RANK1_PRIOR * r2.mean()) \
        / (np.bincount(ou, minlength=nu) + RANK1_PRIOR)
    seen = (np.bincount(ou, minlength=nu) > 0)[unit] & (np.bincount(oc, minlength=nc) > 0)[cfg]
    pred[seen] = (s[unit] * g[cfg] + offset)[seen]
    var[seen] = unit_var[unit][seen]
    return pred, var


def pareto_score(t: pd.DataFrame, trees: np.ndarray, oob: tuple[float, float],
                  tol: float, rank1: bool = True) -> pd.Series:
    """Per point, the expected improvement (nats) of its NLL over the best measured NLL at
    no more bytes in its group, less ``tol``, under a normal law. Its mean: the trees' mean,
    averaged (with ``rank1``) with :func:`rank1_dnll` where that is defined; its variance: the
    trees', plus the out-of-bag error at the predicted damage, plus (where both opinions
    exist) the unit's rank-1 residual variance and the square of half their disagreement.
    Infinite where nothing is known (features unknown, or nothing cheaper measured): such a
    point must be run."""
    score = pd.Series(np.inf, index=t.index)
    known = t[t["measured"] & t["nll"].notna()]
    mu = nan_reduce(np.nanmean, trees)
    a, b = (0.0, 0.0) if np.isnan(oob[0]) else oob
    err = np.sqrt(np.pi / 2) * (a + b * np.abs(mu))   # mean absolute error -> normal sd
    var = nan_reduce(np.nanvar, trees) + err ** 2
    r1, r1_var = rank1_dnll(t) if rank1 else (np.full_like(mu, np.nan),) * 2
    both = ~np.isnan(r1) & ~np.isnan(mu)
    var[both] += r1_var[both] + ((r1 - mu)[both] / 2) ** 2
    mu[both] = (mu[both] + r1[both]) / 2
    sd = np.sqrt(var) + 1e-9
    for key, g in t.groupby(groups(t), sort=True):
        k = known
        for col, v in zip(groups(t), np.atleast_1d(key)):
            k = k[k[col] == v]
        kb, kn = k["model_bytes"].to_numpy(float), k["nll"].to_numpy(float)
        for i in g.index[~g["measured"]]:
            b, fp = t.at[i, "model_bytes"], t.at[i, "metrics.nll_fp"]
            below = kn[kb <= b]
            if np.isnan(mu[i]) or not len(below) or np.isnan(b):
                continue
            z = (below.min() - tol - fp - mu[i]) / sd[i]
            score[i] = float(sd[i] * (z * norm.cdf(z) + norm.pdf(z)))
    return score
