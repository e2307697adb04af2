"""Features that carry GPTQ's gain across families, and leave-one-family-out validation
against issue 22's bar (R^2 of dNLL >= 0.8, MAE <= 25% of mean |dNLL| on rows with
dNLL > 0.01 nats, GPTQ's gain over RTN within 30%), the forest next to every law.

Transfer features (what the records already hold, per job; none needs a model here):

- ``gptq_err_ratio``: GPTQ's calibration-set Hessian-weighted output error over RTN's
  (``quantization.out_err_gptq / out_err_rtn``: the sum over layers of ||(W - Q) X||^2 on the
  calibration inputs). It is how much GPTQ reduces RTN's error on *this* model and format,
  the quantity issue 22 found missing; the RTN row of the same cell gets its GPTQ twin's.
- ``hw_err_rtn_log10``: log10 of RTN's Hessian-weighted error of the same cell.
- ``noise_equiv_log10``: log10 of the landscape's noise-equivalent damage of the job,
  kappa * 10^(-SQNR_RTN/10), times ``gptq_err_ratio`` for GPTQ rows: the physics guess.
- ``weight_kurtosis``, ``weight_absmax_rms_log10``: the model's weight outlier statistics
  (``quantization.weight_kurtosis`` / ``weight_absmax_rms``, recorded since issue 22; the
  mean over the model's records, so every row of a model has them).
- ``fisher_ratio`` (not a forest feature): RTN's error weighted by the model's diagonal
  empirical Fisher, over the same weighting of isotropic noise with each layer's own error
  power: the records' ``metrics.fisher_ratio`` (metric ``fisher``) of the cell's RTN job, or
  a table (``fisher=``; bench/zoo_fisher.py computes one from the weights and calibration-
  like text). No model runs quantized for it. The noise response perturbs every weight of a layer
  alike; where the quantization error sits away from the weights the loss is sensitive to,
  the ratio is below 1 (zoo-neox: 0.5-0.9). The physics guess is multiplied by it.
- ``first_order_dnll``: the job's own ``g . e`` (metric ``first_order``: the fp model's NLL
  gradient on the evaluation text dotted with the job's weight error). The noise response's
  antithetic pairs cancel it, so the guess above is the second-order part only; on text the
  model is not at a minimum of (the zoo on WikiText-2) the first-order part is most of the
  damage and can be negative. The physics guess is ``first_order_dnll`` plus the second-order
  part (a study without the metric: the second-order part alone).

Predictors compared on the same splits (``VARIANTS``): ``forest`` (the predictor's own
features), ``forest+transfer`` (plus the three above), ``forest/physics`` (the forest learns
dNLL / physics guess, so it need not extrapolate the scale of a family it never saw),
``landscape`` (the physics guess itself: nothing is fitted, every input is measured on the
held-out model without evaluating a quantized one; the forest/physics forest learns the
factor on its second-order part, ``(dNLL - first_order) / second-order guess``), and the laws of :mod:`study_fits`
(``noise``, ``precision``, ``format_power``).

Example::

    >>> res = lofo(load_study("results", "zoo_cross"))      # doctest: +SKIP
    >>> res.table                                          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.predictor import (
    TARGET,
    PredictorConfig,
    _forest,
    add_features,
    leave_one_group_out,
    r2_score,
    select_features,
    training_rows,
)
from ptqscale_analysis.study_fits import LAW_PREDICTORS, StudyFitConfig

# (fisher_ratio enters the physics guess only: as a forest feature, a held-out family whose
# ratio lies outside the others' range is sent to whichever family had the nearest one,
# measured: zoo-neox's R^2 fell from 0.81 to -4.7 in zoo_cross_x4)
TRANSFER_FEATURES = ("gptq_err_ratio", "hw_err_rtn_log10", "noise_equiv_log10",
                     "weight_kurtosis", "weight_absmax_rms_log10", "first_order_dnll")
# a Fisher table (bench/zoo_fisher.py): one ratio per model, training length and format
FISHER_KEY = ("model.name", "model.revision", "format.name")
MODEL = ("model.name", "model.revision")
VARIANTS = ("forest", "forest+transfer", "forest/physics", "landscape")
# a cell: one model (and training length) quantized into one format, evaluated on one corpus
CELL = ("model.name", "model.revision", "data.name", "format.name")
BIG_DNLL = 0.01      # issue 22: MAE judged on rows with dNLL above this (nats)
MAE_SHARE = 0.25     # ... against this share of their mean |dNLL|
R2_BAR = 0.8
GAIN_SHARE = 0.30    # GPTQ's gain over RTN predicted within this relative error
PHYSICS_FLOOR = 1e-3  # nats: the forest/physics guess is never taken below this


def _cell(rows: pd.DataFrame) -> list[str]:
    return [c for c in CELL if c in rows]


def add_transfer_features(rows: pd.DataFrame, fisher: pd.DataFrame | None = None
                          ) -> pd.DataFrame:
    """``rows`` with :data:`TRANSFER_FEATURES` (NaN where the records cannot give them);
    ``fisher``: a table of ``fisher_ratio`` by :data:`FISHER_KEY`."""
    df = rows.copy()
    cell = _cell(df)
    key = df[cell].astype(str).agg("|".join, axis=1)
    err = pd.DataFrame(index=df.index)
    for col in ("quantization.out_err_gptq", "quantization.out_err_rtn"):
        err[col] = pd.to_numeric(df[col], errors="coerce") if col in df else np.nan
    gptq = df["method.name"] == "gptq"
    by_cell = err[gptq].groupby(key[gptq]).mean()
    twin = by_cell.reindex(key.to_numpy()).set_axis(df.index)
    with np.errstate(divide="ignore", invalid="ignore"):
        df["gptq_err_ratio"] = (twin["quantization.out_err_gptq"]
                                / twin["quantization.out_err_rtn"]).where(lambda s: np.isfinite(s))
        df["hw_err_rtn_log10"] = np.log10(twin["quantization.out_err_rtn"].where(lambda s: s > 0))
    kappa = pd.to_numeric(df.get("landscape.kappa", pd.Series(np.nan, index=df.index)),
                          errors="coerce")
    equiv = kappa * 10 ** (-pd.to_numeric(df["rtn_sqnr_db"], errors="coerce") / 10)
    equiv = equiv * df["gptq_err_ratio"].where(gptq, 1.0)
    df["fisher_ratio"] = _fisher_ratio(df, fisher, key)
    equiv = equiv * df["fisher_ratio"].fillna(1.0)
    df["noise_equiv_log10"] = np.log10(equiv.where(equiv > 0))
    df["first_order_dnll"] = _first_order(df)
    model = df[[c for c in MODEL if c in df]].astype(str).agg("|".join, axis=1)
    for col, name, log in (("quantization.weight_kurtosis", "weight_kurtosis", False),
                           ("quantization.weight_absmax_rms", "weight_absmax_rms_log10", True)):
        v = pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(np.nan, df.index)
        v = v.groupby(model).transform("mean")
        df[name] = np.log10(v.where(v > 0)) if log else v
    return df


def _first_order(df: pd.DataFrame) -> pd.Series:
    """Each row's ``metrics.first_order_dnll`` (metric ``first_order``), 0 for rows with no
    error (bf16); NaN for a study without the metric (no feature; the guess adds 0). A
    quantized row without it, in a study that has it, is an error: its guess would lose its
    first-order part unseen."""
    if "metrics.first_order_dnll" not in df:
        return pd.Series(np.nan, index=df.index)
    value = pd.to_numeric(df["metrics.first_order_dnll"], errors="coerce")
    lacking = value.isna() & (df["format.name"] != "bf16")
    if lacking.any():
        raise AnalysisError(f"{int(lacking.sum())} quantized job(s) have no "
                            "metrics.first_order_dnll while others do: run them with metric "
                            "first_order (metrics=[...,first_order])")
    return value.fillna(0.0)


def _fisher_ratio(df: pd.DataFrame, fisher: pd.DataFrame | None, cell: pd.Series) -> pd.Series:
    """Each row's ``fisher_ratio``: from the table when one is given, else from the records'
    ``metrics.fisher_ratio`` (metric ``fisher``) of the cell's RTN job; NaN where neither
    exists. A row whose cell the table or the records lack is an error, not a silent 1: the
    guess of that family would change unseen. A format with no error (bf16) takes 1."""
    if fisher is None:
        if "metrics.fisher_ratio" not in df:
            return pd.Series(np.nan, index=df.index)
        value = pd.to_numeric(df["metrics.fisher_ratio"], errors="coerce")
        rtn = (df["method.name"] == "rtn") & (df["format.name"] != "bf16")
        if value[rtn].isna().any():
            raise AnalysisError(f"{int(value[rtn].isna().sum())} of {int(rtn.sum())} RTN jobs "
                                "have no metrics.fisher_ratio: run them with metric fisher "
                                "(metrics=[...,fisher]) or pass a Fisher table (--fisher)")
        by_cell = value[rtn].groupby(cell[rtn]).mean()
        return pd.Series(by_cell.reindex(cell.to_numpy()).to_numpy(float), index=df.index
                         ).fillna(1.0)
    keys = [k for k in FISHER_KEY if k in df]  # a study of one training length has no revision
    missing = [c for c in (*keys, "fisher_ratio") if c not in fisher]
    if missing:
        raise AnalysisError(f"the Fisher table has no column(s) {missing}; it needs "
                            f"{[*keys, 'fisher_ratio']}")
    table = fisher.astype({k: str for k in keys}).drop_duplicates(keys).set_index(keys)
    index = pd.MultiIndex.from_frame(df[keys].astype(str))
    ratio = table["fisher_ratio"].reindex(index)
    absent = ~index.isin(table.index)
    if absent.any():
        raise AnalysisError(f"the Fisher table lacks {int(absent.sum())} row(s) of the study, "
                            f"e.g. {index[absent][0]}")
    return pd.Series(pd.to_numeric(ratio, errors="coerce").to_numpy(float), index=df.index
                     ).fillna(1.0)


@dataclass
class LofoResult:
    group_column: str
    predictions: pd.DataFrame   # per held-out row: group, cell, method, measured, per predictor
    table: pd.DataFrame         # per (group, predictor): the must-show metrics and pass flags
    features: dict[str, list[str]]   # per forest variant, the features it used
    importances: pd.Series      # forest+transfer trained on every row: what carries


def lofo(frame: pd.DataFrame, group: str = "model.family", cfg: PredictorConfig | None = None,
         law_cfg: StudyFitConfig | None = None, fisher: pd.DataFrame | None = None
         ) -> LofoResult:
    """Leave-one-``group``-out validation of the forest variants and the laws (dNLL);
    ``fisher``: a Fisher table (:func:`add_transfer_features`)."""
    cfg, law_cfg = cfg or PredictorConfig(), law_cfg or StudyFitConfig()
    if cfg.target != TARGET:
        raise AnalysisError("lofo validates dNLL (issue 22); --target is not supported here")
    rows = training_rows(frame)
    if group not in rows:
        raise AnalysisError(f"no column {group!r} to leave out; e.g. model.family, model.size")
    methods = sorted(rows["method.name"].unique())
    X = add_transfer_features(add_features(rows, methods), fisher)
    base, _ = select_features(X, methods)
    extra = [f for f in TRANSFER_FEATURES if X[f].notna().all()]
    # forest/physics needs a guess in some rows at least; rows without one (no landscape, a
    # kappa <= 0 from noise) take the floor
    physics = base + extra if X["noise_equiv_log10"].notna().any() else []
    feats = {"forest": base, "forest+transfer": base + extra, "forest/physics": physics}

    def forests(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
        part = test[[*_cell(test), "method.name"]].copy()
        part["measured"] = test[TARGET].to_numpy(float)
        part["measured_se"] = pd.to_numeric(test.get("metrics.dnll_se", np.nan), errors="coerce")
        for name, f in feats.items():
            part[name] = _fit_predict(name, f, train, test, cfg) if f else np.nan
        part["landscape"] = (test["first_order_dnll"].fillna(0.0).to_numpy(float)
                             + 10 ** test["noise_equiv_log10"].to_numpy(float))
        return part

    preds = leave_one_group_out(X, X[group].astype(str), f"leave-one-out over {group}",
                                forests, law_cfg)
    models = [*VARIANTS, *LAW_PREDICTORS]
    full = _forest(cfg).fit(X[feats["forest+transfer"]].to_numpy(float), X[TARGET].to_numpy(float))
    imp = pd.Series(full.feature_importances_, index=feats["forest+transfer"])
    return LofoResult(group, preds, must_show_table(preds, models), feats,
                      imp.sort_values(ascending=False))


def _fit_predict(name: str, feats: list[str], train: pd.DataFrame, test: pd.DataFrame,
                 cfg: PredictorConfig) -> np.ndarray:
    y = train[TARGET].to_numpy(float)
    if name != "forest/physics":
        return _forest(cfg).fit(train[feats].to_numpy(float), y).predict(test[feats].to_numpy(float))
    # the forest learns the factor between the damage beyond its first-order part and the
    # second-order guess (scale-free); the guess is floored so that jobs of negligible damage
    # (8-bit formats: guess ~1e-6, measured noise ~1e-4) do not teach it factors of hundreds
    def guess(rows):
        g = 10 ** rows["noise_equiv_log10"].to_numpy(float)
        return np.maximum(np.nan_to_num(g, nan=PHYSICS_FLOOR), PHYSICS_FLOOR)

    def first(rows):
        return rows["first_order_dnll"].fillna(0.0).to_numpy(float)
    forest = _forest(cfg).fit(train[feats].to_numpy(float), (y - first(train)) / guess(train))
    return first(test) + forest.predict(test[feats].to_numpy(float)) * guess(test)


def gain_frame(preds: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """GPTQ's gain over RTN per cell (dNLL_rtn - dNLL_gptq), measured and per predictor."""
    keys = ["group", *[c for c in CELL if c in preds]]
    value_cols = ["measured", *models]
    wide = preds.pivot_table(index=keys, columns="method.name", values=value_cols,
                             aggfunc="mean", dropna=False)
    if "rtn" not in wide.columns.get_level_values(1) or \
            "gptq" not in wide.columns.get_level_values(1):
        return pd.DataFrame(columns=[*keys, *value_cols])
    gain = wide.xs("rtn", axis=1, level=1) - wide.xs("gptq", axis=1, level=1)
    return gain.dropna(subset=["measured"]).reset_index()


def noise_ceiling(part: pd.DataFrame) -> dict:
    """What the evaluation's own noise leaves to any predictor of one group's rows, from each
    job's ``dnll_se``: ``r2_ceiling``, the expected R^2 of a predictor that knew every job's
    true dNLL (1 - mean se^2 / variance of the measured dNLL), and ``mae_floor_share``, its
    expected MAE on rows above ``BIG_DNLL`` (sqrt(2/pi) se, a normal error) as a share of their
    mean |dNLL|. NaN where the records hold no ``dnll_se`` (measured before 2026-12-05)."""
    se = part["measured_se"] if "measured_se" in part else pd.Series(np.nan, part.index)
    if se.isna().any() or len(part) < 2:
        return {"r2_ceiling": np.nan, "mae_floor_share": np.nan}
    y = part["measured"].to_numpy(float)
    big = (y > BIG_DNLL)
    floor = (float(np.sqrt(2 / np.pi) * se[big].mean() / np.abs(y[big]).mean())
             if big.any() else np.nan)
    return {"r2_ceiling": float(1 - np.mean(se.to_numpy(float) ** 2) / np.var(y)),
            "mae_floor_share": floor}


def must_show_table(preds: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """Per held-out group and predictor: R^2 and MAE of dNLL, MAE/mean|dNLL| on rows with
    dNLL > 0.01, the relative error of GPTQ's summed gain over RTN, the pass flags, and the
    group's :func:`noise_ceiling` (the same for every predictor)."""
    gains = gain_frame(preds, models)
    out = []
    for g, part in preds.groupby("group"):
        big = part[part["measured"] > BIG_DNLL]
        gp = gains[gains["group"] == g]
        ceiling = noise_ceiling(part)
        for m in models:
            ok = part[m].notna()
            row = {"group": g, "predictor": m, "rows": int(ok.sum()),
                   "coverage": float(ok.mean())}
            y, p = part["measured"][ok], part[m][ok]
            row["r2_dnll"] = r2_score(y.to_numpy(), p.to_numpy()) if ok.sum() >= 2 else np.nan
            b = big[big[m].notna()]
            row["mae_big"] = float(np.mean(np.abs(b["measured"] - b[m]))) if len(b) else np.nan
            row["mae_share"] = (row["mae_big"] / float(np.mean(np.abs(b["measured"])))
                                if len(b) else np.nan)
            gm = gp[gp[m].notna()] if m in gp else gp.iloc[:0]
            total = float(gm["measured"].sum()) if len(gm) else np.nan
            row["gain_measured"] = total
            row["gain_rel_err"] = (abs(float(gm[m].sum()) - total) / abs(total)
                                   if len(gm) and total != 0 else np.nan)
            row["pass_r2"] = bool(row["r2_dnll"] >= R2_BAR)
            row["pass_mae"] = bool(row["mae_share"] <= MAE_SHARE)
            row["pass_gain"] = bool(row["gain_rel_err"] <= GAIN_SHARE)
            out.append(row | ceiling)
    return pd.DataFrame(out)


def markdown_table(table: pd.DataFrame) -> str:
    """The must-show table as Markdown (3 significant digits, pass flags as yes/no)."""
    df = table.copy()
    for c in ("pass_r2", "pass_mae", "pass_gain"):
        df[c] = df[c].map({True: "yes", False: "no"})
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v)
                                       for v in r) + " |")
    return "\n".join(lines)
