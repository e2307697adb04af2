"""Questions a researcher asks of a study: "NLL of model X in format Y with method Z?" and
"the best (size, format, method) under a memory budget?", the latter on the NLL or on any
measured field with a declared direction (task accuracy, ``kl_mean``, ``top1_agreement``).

Example::

    >>> frame = load_study("results", "quickstart")                        # doctest: +SKIP
    >>> p = predict_nll(train_predictor(frame), frame, "mxfp4", "gptq", model="zoo-16m")
    >>> best_under_budget(frame, 50e6).measured                             # doctest: +SKIP
    >>> best_under_budget(frame, 50e6, target="task.ptq_gutenberg_cloze.acc")  # doctest: +SKIP
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.load import Target, add_target, higher_is_better, metric_of
from ptqscale_analysis.predictor import Predictor, add_features

# Axes along which NLLs are not comparable: another corpus, another tokenizer (a family has
# one), another activation scheme. Queries answer within one value of each, never across.
# The evaluation protocol (preset, seqlen) splits too where a study varies it.
SPLITS = {"data": "data.name", "family": "model.family", "activations": "activations",
          "preset": "eval.preset", "seqlen": "eval.seqlen"}


def select(frame: pd.DataFrame, **where: str | None) -> pd.DataFrame:
    """Rows of ``frame`` with ``SPLITS[axis] == value`` for each given axis (None: all).

    >>> select(frame, data="wikitext2")                                 # doctest: +SKIP
    """
    for axis, value in where.items():
        if value is None:
            continue
        col = SPLITS[axis]
        have = sorted(frame[col].astype(str).unique()) if col in frame else []
        if value not in have:
            raise AnalysisError(f"--{axis} {value!r} is not in the study; {col} values: {have}")
        frame = frame[frame[col].astype(str) == value]
    return frame


def split(frame: pd.DataFrame, extra: tuple[str, ...] | list[str] = ()
          ) -> list[tuple[dict[str, str], pd.DataFrame]]:
    """``frame`` cut along every axis of ``SPLITS`` that it holds, then each group along the
    ``extra`` columns (compared as text, e.g. :func:`setting_columns`): [(labels, rows), ...].

    Labels name only the axes with more than one value in ``frame`` (an ``extra`` column: in
    its group), {} when nothing splits.
    """
    cols = [c for c in SPLITS.values() if c in frame]
    varying = [c for c in cols if frame[c].astype(str).nunique() > 1]
    groups = [((), frame)] if not cols else frame.groupby(cols, sort=True, dropna=False)
    out = []
    for key, rows in groups:   # NaN: a group, not dropped
        values = dict(zip(cols, map(str, np.atleast_1d(key))))
        labels = {c: values[c] for c in varying}
        texts = rows[[c for c in extra if c in rows]].map(str)   # lists, NaN: text too
        if texts.empty or (texts.nunique() == 1).all():
            out.append((labels, rows))
            continue
        inner = [c for c in texts if texts[c].nunique() > 1]
        for sub, part in texts.groupby(inner, sort=True):
            out.append((labels | dict(zip(inner, np.atleast_1d(sub))), rows.loc[part.index]))
    return out


def setting_columns(frame: pd.DataFrame, target: Target) -> list[str]:
    """The settings of the metric that measured the target (``metric_info.<metric>.settings.*``:
    few-shot count, limit, task versions ...): values measured under other settings are not
    comparable. The NLL's protocol is split by ``SPLITS`` instead."""
    metric = None if target.name == "dnll" else metric_of(frame, target.source)
    if metric is None:
        return []
    return sorted(c for c in frame.columns if c.startswith(f"metric_info.{metric}.settings."))


def split_label(labels: dict[str, str]) -> str:
    """{"data.name": "wikitext2", "model.family": "zoo"} -> "data=wikitext2, family=zoo";
    a metric setting ``metric_info.tasks.settings.num_fewshot`` reads ``tasks.num_fewshot``."""
    short = {v: k for k, v in SPLITS.items()}
    return ", ".join(f"{short.get(k, k.replace('metric_info.', '').replace('.settings.', '.'))}"
                     f"={v}" for k, v in labels.items())


@dataclass
class Prediction:
    model: str
    format: str
    method: str
    nll: float
    nll_low: float
    nll_high: float
    dnll: float
    nll_fp: float
    measured_nll: float | None  # the store's value when this job was run
    features: dict[str, float]


def model_features(frame: pd.DataFrame, model: str) -> dict:
    """Model-level columns of ``model`` from the store (its first record in ``frame``).

    ``frame`` must hold one corpus: the full-precision NLL and the landscape are per corpus.
    """
    rows = frame[frame["model.name"] == model]
    if rows.empty:
        raise AnalysisError(f"model {model!r} is not in the study; models: "
                            f"{sorted(frame['model.name'].unique())}")
    if "data.name" in rows and rows["data.name"].nunique() > 1:
        raise AnalysisError(f"model {model!r} was measured on several corpora "
                            f"{sorted(rows['data.name'].unique())}; pick one (--data)")
    return rows.iloc[0].to_dict()


def _format_row(predictor: Predictor, fmt: str, frame: pd.DataFrame | None,
                model: str | None) -> dict:
    """Format features; RTN SQNR of this very (model, format) pair when it was measured."""
    if predictor.formats is None or fmt not in predictor.formats.index:
        seen = [] if predictor.formats is None else sorted(predictor.formats.index)
        raise AnalysisError(f"format {fmt!r} was never seen in the training records, so its "
                            f"features (RTN SQNR, bits) are unknown; seen formats: {seen}")
    row = predictor.formats.loc[fmt].to_dict()
    if frame is not None and model is not None:
        pair = frame[(frame["model.name"] == model) & (frame["format.name"] == fmt)]
        if pair["rtn_sqnr_db"].notna().any():
            row["rtn_sqnr_db"] = float(pair["rtn_sqnr_db"].dropna().iloc[0])
    return row


def predict_nll(predictor: Predictor, frame: pd.DataFrame | None, fmt: str, method: str,
                model: str | None = None, features: dict | None = None) -> Prediction:
    """Predicted NLL of a model (from the store, or given ``features``) in ``fmt``/``method``.

    ``features`` needs ``params.total`` and ``metrics.nll_fp`` and every landscape column the
    predictor uses; it overrides store values when both are given.
    """
    if model is None and not features:
        raise AnalysisError("give a model from the store or its features "
                            "(params.total, metrics.nll_fp, ...)")
    if predictor.cfg.target != "dnll":
        raise AnalysisError(f"this predictor learned the damage to {predictor.cfg.target}, "
                            "not dNLL: an NLL needs a predictor trained with target dnll")
    X = feature_rows(predictor, frame, [(model, fmt, method)], features)
    out = predictor.predict(X).iloc[0]
    nll_fp = float(X["metrics.nll_fp"].iloc[0])
    return Prediction(model or "(given features)", fmt, method, float(nll_fp + out["dnll"]),
                      float(nll_fp + out["dnll_low"]), float(nll_fp + out["dnll_high"]),
                      float(out["dnll"]),
                      nll_fp, _measured(frame, model, fmt, method),
                      {f: float(X[f].iloc[0]) for f in predictor.features})


@dataclass
class TargetPrediction:
    """A prediction of another target than dNLL (``PredictorConfig.target``): the field's
    value after quantization, its interval, the damage and the full-precision value."""

    model: str
    format: str
    method: str
    target: str
    value: float
    low: float
    high: float
    damage: float
    fp: float
    measured: float | None


def predict_target(predictor: Predictor, frame: pd.DataFrame, fmt: str, method: str,
                   model: str) -> TargetPrediction:
    """The predictor's target (e.g. ``task.ptq_gutenberg_cloze.acc``) of a model of the study
    in ``fmt``/``method``: its full-precision value (the model's method=none record) moved by
    the predicted damage. ``frame`` holds one corpus (see :func:`model_features`).
    """
    df, t = add_target(frame, predictor.cfg.target)
    rows = df[df["model.name"] == model]
    fp = rows[t.fp].dropna()
    if rows.empty or fp.empty:
        raise AnalysisError(f"model {model!r} has no full-precision {t.source} in the study "
                            "(its method=none record); models with one: "
                            f"{sorted(df.loc[df[t.fp].notna(), 'model.name'].unique())}")
    fp_value = float(fp.iloc[0])
    X = feature_rows(predictor, df, [(model, fmt, method)], {"target_fp": fp_value})
    out = predictor.predict(X).iloc[0]
    sign = -1.0 if t.higher_is_better else 1.0   # damage > 0 lowers a higher-is-better value
    ends = sorted(fp_value + sign * out[c] for c in ("dnll_low", "dnll_high"))
    hit = rows[(rows["format.name"] == fmt) & (rows["method.name"] == method)][t.source]
    return TargetPrediction(model, fmt, method, t.name, fp_value + sign * float(out["dnll"]),
                            float(ends[0]), float(ends[1]), float(out["dnll"]), fp_value,
                            float(hit.iloc[0]) if len(hit) else None)


def feature_rows(predictor: Predictor, frame: pd.DataFrame | None, queries: list[tuple],
                 features: dict | None = None) -> pd.DataFrame:
    """Feature frame for (model, format, method) queries, checked against the predictor."""
    rows = []
    for model, fmt, method in queries:
        if method not in predictor.methods:
            raise AnalysisError(f"method {method!r} was never seen in the training records; "
                                f"seen methods: {predictor.methods}")
        base = model_features(frame, model) if model is not None else {}
        base |= dict(features or {})
        base |= _format_row(predictor, fmt, frame, model)
        rows.append(base | {"method.name": method, "format.name": fmt})
    X = add_features(pd.DataFrame(rows), predictor.methods)
    missing = [f for f in predictor.features if f not in X or X[f].isna().any()]
    if missing:
        raise AnalysisError(f"missing model features {missing}; the predictor uses "
                            f"{predictor.features}")
    return X


def _measured(frame, model, fmt, method) -> float | None:
    if frame is None or model is None:
        return None
    rows = frame[(frame["model.name"] == model) & (frame["format.name"] == fmt)
                 & (frame["method.name"] == method)]
    return float(rows["metrics.nll"].iloc[0]) if len(rows) else None


# ---- memory budget ----------------------------------------------------------------------

def pareto_frontier(frame: pd.DataFrame, x: str = "model_bytes",
                    y: str = "metrics.nll") -> pd.DataFrame:
    """Rows no other row beats on both ``x`` (smaller is better) and ``y`` (in the direction
    its records declare, see :func:`~ptqscale_analysis.load.higher_is_better`), sorted by ``x``."""
    frame = frame[frame[y].notna()]   # rows that did not measure y (another corpus's task)
    if frame.empty:
        raise AnalysisError(f"no rows with a {y} to build a Pareto frontier from")
    sign = -1.0 if higher_is_better(frame, y) else 1.0
    cost = frame[y].to_numpy(float) * sign          # smaller is better from here on
    order = np.lexsort((cost, frame[x].to_numpy(float)))
    df, cost = frame.iloc[order], cost[order]
    best = np.minimum.accumulate(cost)
    keep = np.r_[True, cost[1:] < best[:-1]]
    return df[keep]


def parse_bytes(text: str | float) -> float:
    """'500MB', '1.5GiB', '2e9' -> bytes (SI for kB/MB/GB, binary for KiB/MiB/GiB)."""
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in units:
        raise AnalysisError(f"cannot read the budget {text!r}; write e.g. 500MB, 1.5GiB or "
                            f"2e9 (units: {sorted(u for u in units if u)})")
    value = float(m.group(1)) * units[m.group(2)]
    if value <= 0:
        raise AnalysisError(f"the budget must be > 0 bytes, got {text!r}")
    return value


@dataclass
class BudgetAnswer:
    budget_bytes: float
    target: Target                      # the quantity: its source column and direction
    measured: pd.Series | None          # best measured record under the budget
    predicted: pd.Series | None         # best predicted configuration (measured or not)
    candidates: pd.DataFrame            # every (model, format, method): bytes, value, low, high


def _best(values: pd.Series, higher_is_better: bool):
    return values.idxmax() if higher_is_better else values.idxmin()


def candidate_table(frame: pd.DataFrame, predictor: Predictor) -> pd.DataFrame:
    """Every model x seen format x seen method (plus 16-bit), with bytes and the predicted
    value of the predictor's target (``value``, ``low``, ``high``: the NLL for a dNLL
    predictor; else the field, the model's full-precision value moved by the predicted damage).

    Bytes: the quantized weights (``params.quantized``) at the format's effective bits, every
    other parameter (embedding, norms, an untied head) at 16 bits. ``frame``: one corpus.
    Models without a full-precision value of the target (no method=none record) are left out.
    """
    df, t = add_target(frame, predictor.cfg.target)
    if t.name != "dnll":   # the forest's model feature for the target's fp level
        df = df.assign(target_fp=df[t.fp])
    if "params.quantized" not in df:  # (load.add_derived maps params.quantizable to it)
        raise AnalysisError("records lack params.quantizable: the bytes of a configuration "
                            "not yet run cannot be computed")
    models = df[df[t.fp].notna()].drop_duplicates("model.name").set_index("model.name")
    if models.empty:
        raise AnalysisError(f"no model has a full-precision {t.source} (its method=none "
                            "record): nothing to predict from")
    queries = [(m, f, meth) for m in models.index for f in predictor.formats.index
               for meth in predictor.methods]
    X = feature_rows(predictor, df, queries)
    pred = predictor.predict(X)
    names = [q[0] for q in queries]
    total = models.loc[names, "params.total"].to_numpy(float)
    quantized = models.loc[names, "params.quantized"].to_numpy(float)
    fp = models.loc[names, t.fp].to_numpy(float)
    sign = -1.0 if t.higher_is_better else 1.0   # damage > 0 lowers a higher-is-better value
    ends = np.sort([fp + sign * pred[c].to_numpy() for c in ("dnll_low", "dnll_high")], axis=0)
    table = pd.DataFrame({
        "model.name": names, "format.name": [q[1] for q in queries],
        "method.name": [q[2] for q in queries],
        "model_bytes": quantized * X["bits_per_weight"].to_numpy(float) / 8 + (total - quantized) * 2,
        "value": fp + sign * pred["dnll"].to_numpy(), "low": ends[0], "high": ends[1],
        "source": "predicted"})
    base = pd.DataFrame({"model.name": models.index, "format.name": "bf16", "method.name": "none",
                         "model_bytes": 2.0 * models["params.total"].to_numpy(float),
                         "value": models[t.fp].to_numpy(float), "source": "measured fp"})
    return pd.concat([base, table], ignore_index=True)


def best_under_budget(frame: pd.DataFrame, budget_bytes: float,
                      predictor: Predictor | None = None,
                      target: str | None = None) -> BudgetAnswer:
    """Best configuration whose model fits in ``budget_bytes``, measured and predicted: the
    lowest NLL, or for ``target`` (a measured field, e.g. ``task.ptq_gutenberg_cloze.acc``,
    ``kl_mean``, ``top1_agreement``) its best value in the direction the records declare.

    ``target`` defaults to the predictor's (else ``dnll``, the NLL) and must be the predictor's.
    ``frame`` must be one group of :func:`split` (one corpus, tokenizer, activation scheme and,
    for another target than the NLL, one set of metric settings: :func:`setting_columns`).
    """
    if target is None:
        target = predictor.cfg.target if predictor is not None else "dnll"
    df, t = add_target(frame, target)
    if predictor is not None and add_target(df, predictor.cfg.target)[1] != t:
        raise AnalysisError(f"the predictor learned {predictor.cfg.target}, not {target}: "
                            "train one with that target")
    if len(split(df, setting_columns(df, t))) > 1:
        raise AnalysisError(f"values of {t.source} of different corpora/families/activation "
                            "schemes/metric settings are not comparable; ask per group of "
                            "split(frame, setting_columns(frame, target))")
    held = df[df[t.source].notna()]
    if held.empty:
        raise AnalysisError(f"no record of this group measured {t.source}")
    fits = held[held["model_bytes"] <= budget_bytes]
    measured = fits.loc[_best(fits[t.source], t.higher_is_better)] if len(fits) else None
    candidates, predicted = pd.DataFrame(), None
    if predictor is not None:
        candidates = candidate_table(df, predictor)
        under = candidates[candidates["model_bytes"] <= budget_bytes]
        predicted = under.loc[_best(under["value"], t.higher_is_better)] if len(under) else None
    if measured is None and predicted is None:
        smallest = held.loc[held["model_bytes"].idxmin()]
        raise AnalysisError(
            f"nothing fits in {budget_bytes:.4g} bytes; the smallest measured configuration is "
            f"{smallest['model.name']}/{smallest['format.name']} at "
            f"{smallest['model_bytes']:.4g} bytes")
    return BudgetAnswer(budget_bytes, t, measured, predicted, candidates)
