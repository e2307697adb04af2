"""The ``law`` question of the guided design (:mod:`ptqscale_analysis.active`): the size
exponent gamma of the noise-equivalent law dNLL = K N^-gamma 10^(-SQNR/10), fitted per
family x corpus x method group with residual-bootstrap intervals (:mod:`ptqscale_analysis.laws`).

The next batch goes where the exponents are least certain: a point's score is its group's
relative interval width (infinite before the group has a fit) times the leverage of its
size on a line in log N, 1/n + (x - mean)^2 / Sxx over the group's measured sizes (a size at
an end of the range, or not yet measured, moves the slope most). Points whose predicted
dNLL is below ``DesignConfig.law_min_dnll`` score 0: the log-space fit drops them or they
are noise. A group whose grid holds one size cannot be fitted, whatever runs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ptqscale_analysis.laws import FitConfig
from ptqscale_analysis.study_fits import StudyFitConfig, _label, fit_study_laws

GROUPS = ("model.family", "data.name", "method.name")
SIZE = "params.blocks"   # N of the laws (StudyFitConfig.size_column)


def law_table(frame: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """gamma, its interval and relative half-width per group fitted on ``frame``."""
    cfg = StudyFitConfig(fit=FitConfig(n_boot=n_boot, seed=seed))
    try:
        table = fit_study_laws(frame, cfg, ("noise",)).table()
    except Exception:   # noqa: BLE001 - too few records yet: no fit, every group uncertain
        return pd.DataFrame(columns=["group", "value", "ci_low", "ci_high", "rel_width"])
    g = table[table["param"] == "gamma"].copy()
    g["rel_width"] = (g["ci_high"] - g["ci_low"]) / (2 * g["value"].abs())
    return g[["group", "value", "ci_low", "ci_high", "rel_width"]].reset_index(drop=True)


def group_label(row: pd.Series) -> str:
    """The label study_fits gives a group: "family=..., data=..., method=..."."""
    return _label({c: row[c] for c in GROUPS if c in row})


def law_score(t: pd.DataFrame, fits: pd.DataFrame, min_dnll: float) -> pd.Series:
    """Per point not yet run, how much running it could narrow its group's exponent."""
    width = dict(zip(fits["group"], fits["rel_width"].fillna(np.inf)))
    labels = t.apply(group_label, axis=1)
    x = np.log(pd.to_numeric(t.get(SIZE), errors="coerce"))
    score = pd.Series(0.0, index=t.index)
    for label, g in t.groupby(labels):
        if x[g.index].nunique() < 2:
            continue   # one size in the grid: no size law for this group
        seen = x[g.index[g["measured"] & (g["dnll"] > min_dnll)]]
        sxx = float(((seen - seen.mean()) ** 2).sum()) if len(seen) else 0.0
        lev = (1 / max(len(seen), 1) + (x[g.index] - seen.mean()) ** 2 / sxx) if sxx > 0 \
            else pd.Series(np.inf, index=g.index)
        useful = (~g["measured"]) & (g["dnll"] > min_dnll)
        score[g.index[useful]] = width.get(label, np.inf) * lev[useful]
    return score


def law_moved(prev: pd.DataFrame, now: pd.DataFrame, score: pd.Series) -> float:
    """Largest relative change of a group's gamma between two fits (inf: a new group, or a
    group that could be fitted still has none: some point scores infinite)."""
    if now.empty or not np.isfinite(score).all():
        return np.inf
    old = dict(zip(prev["group"], prev["value"]))
    if any(g not in old for g in now["group"]):
        return np.inf
    return float(max(abs(v - old[g]) / abs(v) for g, v in zip(now["group"], now["value"])))
