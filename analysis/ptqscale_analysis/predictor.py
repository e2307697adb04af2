"""A random forest that predicts post-PTQ dNLL (and NLL = NLL_fp + dNLL) from features.

Or the damage to any other measured field: ``PredictorConfig(target="kl_mean")`` or
``target="task.ptq_gutenberg_cloze.acc"`` (accuracy lost; :func:`ptqscale_analysis.load.add_target`);
the target's full-precision value is then a model feature too. The predictions' columns keep
the names ``dnll``, ``dnll_low``, ``dnll_high`` whatever the target.

Features (``candidate_features``): model -- log10 parameters, full-precision NLL, every
``landscape.*`` column; format/method -- element bits, block size (0 = no shared-scale
block), effective bits per weight, RTN weight SQNR, one-hot method. Only features present
in every training row are used; the others are dropped and listed in ``Predictor.dropped``.

The interval of a prediction is the spread of the trees' predictions (quantiles across
trees; Meinshausen 2006 would need leaf quantiles, this is its cheap cousin).

Example::

    >>> pred = train_predictor(load_study("results", "quickstart"))      # doctest: +SKIP
    >>> cv = cross_validate(frame, scheme="size")                          # doctest: +SKIP
    >>> cv.metrics                                                          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn
from sklearn.ensemble import RandomForestRegressor

from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.load import add_target, weight_only
from ptqscale_analysis.study_fits import LAW_PREDICTORS, StudyFitConfig, law_predictions

FORMAT_FEATURES = ("format.element_bits", "format.block_size", "bits_per_weight", "rtn_sqnr_db")
MODEL_FEATURES = ("log10_params", "metrics.nll_fp")
SCHEMES = {"size": "model.size", "family": "model.family"}
TARGET = "dnll"


@dataclass(frozen=True)
class PredictorConfig:
    """Forest settings (explicit, all recorded with a saved predictor)."""

    n_estimators: int = 300
    min_samples_leaf: int = 1
    max_features: float = 1.0
    seed: int = 0
    interval: float = 0.9
    n_jobs: int = 1
    target: str = "dnll"   # or any measured field: the damage to it (module docstring)

    def __post_init__(self):
        if self.n_estimators < 2:
            raise AnalysisError(f"n_estimators must be >= 2 (an interval needs trees), "
                                f"got {self.n_estimators}")
        if not 0 < self.interval < 1:
            raise AnalysisError(f"interval must be in (0, 1), got {self.interval}")


@dataclass
class Predictor:
    forest: RandomForestRegressor
    features: list[str]
    methods: list[str]
    cfg: PredictorConfig
    records_sha256: str
    dropped: list[str] = field(default_factory=list)
    formats: pd.DataFrame | None = None  # per format: element bits, block, bits, RTN SQNR

    def predict(self, X: pd.DataFrame) -> pd.DataFrame:
        """dNLL mean and interval per row of a feature frame (columns ``self.features``)."""
        missing = [f for f in self.features if f not in X]
        if missing:
            raise AnalysisError(f"missing features {missing}; the predictor uses {self.features}")
        values = X[self.features].to_numpy(float)
        trees = np.stack([t.predict(values) for t in self.forest.estimators_])
        q = (1 - self.cfg.interval) / 2
        return pd.DataFrame({"dnll": trees.mean(0), "dnll_low": np.quantile(trees, q, axis=0),
                             "dnll_high": np.quantile(trees, 1 - q, axis=0)}, index=X.index)

    def importances(self) -> pd.Series:
        """Mean decrease in impurity per feature, largest first."""
        imp = pd.Series(self.forest.feature_importances_, index=self.features)
        return imp.sort_values(ascending=False)


def training_rows(frame: pd.DataFrame, target: str = TARGET) -> pd.DataFrame:
    """Weight-only quantized rows (the baseline has dNLL = 0 by construction) with a dNLL
    (with a damage to ``target``: its column is ``TARGET`` in the rows returned).

    Rows that quantize activations too are left out: no feature describes the activation
    scheme, so the forest would average schemes.
    """
    frame, t = add_target(frame, target)
    rows = weight_only(frame)
    rows = rows[~rows["is_baseline"] & rows[t.column].notna()]
    if rows.empty:
        raise AnalysisError(f"no weight-only quantized records with a {t.label} to learn from"
                            + ("" if t.name == "dnll" else
                               " (its full-precision value comes from method=none rows)"))
    if t.name != "dnll":   # the forest and CV read TARGET; the fp level is a model feature
        rows = rows.assign(**{TARGET: rows[t.column], "target_fp": rows[t.fp]})
    return rows


def add_features(frame: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """``frame`` with the engineered feature columns (log size, block 0, one-hot method)."""
    df = frame.copy()
    df["log10_params"] = np.log10(pd.to_numeric(df["params.total"], errors="coerce"))
    if "format.block_size" in df:
        df["format.block_size"] = pd.to_numeric(df["format.block_size"]).fillna(0.0)
    for m in methods:
        df[f"method={m}"] = (df["method.name"] == m).astype(float)
    return df


# Landscape columns that describe the model; the rest of that record group is bookkeeping
# (costs, budgets, standard errors) or job-level (noise_equivalent_dnll uses the job's own
# SQNR, so a configuration not yet run has none: kappa and rtn_sqnr_db carry it).
_LANDSCAPE_FEATURE = re.compile(r"^landscape\.(kappa|kappa_h|kappa_ratio|s_star_db|hessian_trace|"
                                r"top_eigenvalue|dnll_at_[0-9.]+db)$")


def candidate_features(frame: pd.DataFrame, methods: list[str]) -> list[str]:
    landscape = sorted(c for c in frame.columns if _LANDSCAPE_FEATURE.match(c))
    target_fp = ["target_fp"] if "target_fp" in frame else []
    return [*MODEL_FEATURES, *target_fp, *landscape, *FORMAT_FEATURES,
            *(f"method={m}" for m in methods)]


def select_features(frame: pd.DataFrame, methods: list[str]) -> tuple[list[str], list[str]]:
    """(used, dropped): candidates that are numeric and present in every row, and the rest."""
    used, dropped = [], []
    for f in candidate_features(frame, methods):
        ok = f in frame and pd.to_numeric(frame[f], errors="coerce").notna().all()
        (used if ok else dropped).append(f)
    return used, dropped


def records_sha256(rows: pd.DataFrame) -> str:
    """sha256 of the training records (job key, features' sources and target), order-free."""
    key = "job_key" if "job_key" in rows else "name"
    cols = sorted(c for c in rows.columns if c.startswith(("metrics.", "format.", "method.",
                                                           "params.", "landscape.", "model.")))
    payload = rows.sort_values(key)[[key, *cols]].to_json(orient="values", double_precision=15)
    return hashlib.sha256(payload.encode()).hexdigest()


def train_predictor(frame: pd.DataFrame, cfg: PredictorConfig | None = None) -> Predictor:
    """Fit the forest on every quantized row of ``frame`` (a :func:`load_study` frame)."""
    cfg = cfg or PredictorConfig()
    rows = training_rows(frame, cfg.target)
    methods = sorted(rows["method.name"].unique())
    X = add_features(rows, methods)
    features, dropped = select_features(X, methods)
    forest = _forest(cfg).fit(X[features].to_numpy(float), X[TARGET].to_numpy(float))
    return Predictor(forest, features, methods, cfg, records_sha256(rows), dropped,
                     format_table(rows))


def _forest(cfg: PredictorConfig) -> RandomForestRegressor:
    return RandomForestRegressor(n_estimators=cfg.n_estimators, random_state=cfg.seed,
                                 min_samples_leaf=cfg.min_samples_leaf,
                                 max_features=cfg.max_features, n_jobs=cfg.n_jobs)


def format_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per format: its features (RTN SQNR averaged over models), for queries on new pairs."""
    cols = [c for c in FORMAT_FEATURES if c in rows]
    df = rows.copy()
    if "format.block_size" in df:
        df["format.block_size"] = pd.to_numeric(df["format.block_size"]).fillna(0.0)
    return df.groupby("format.name")[cols].mean()


# ---- grouped cross-validation -----------------------------------------------------------

@dataclass
class CVResult:
    scheme: str
    predictions: pd.DataFrame  # one row per held-out record: group, measured, per-model preds
    metrics: pd.DataFrame      # one row per predictor: R^2 and MAE of dNLL and NLL, coverage
    per_group: pd.DataFrame    # MAE of dNLL per held-out group and predictor
    features: list[str]


def cross_validate(frame: pd.DataFrame, scheme: str = "size", cfg: PredictorConfig | None = None,
                   law_cfg: StudyFitConfig | None = None) -> CVResult:
    """Leave-one-group-out CV of the forest and the laws (``scheme``: 'size' or 'family')."""
    if scheme not in SCHEMES:
        raise AnalysisError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    cfg, law_cfg = cfg or PredictorConfig(), law_cfg or StudyFitConfig()
    if law_cfg.target != cfg.target:   # the laws predict what the forest predicts
        law_cfg = StudyFitConfig(law_cfg.size_column, law_cfg.group_by, law_cfg.min_dnll,
                                 law_cfg.fit, cfg.target)
    rows = training_rows(frame, cfg.target)
    methods = sorted(rows["method.name"].unique())
    X = add_features(rows, methods)
    features, _ = select_features(X, methods)

    def forest(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
        fit = _forest(cfg).fit(train[features].to_numpy(float), train[TARGET].to_numpy(float))
        fp = test["metrics.nll_fp"] if cfg.target == TARGET else test["target_fp"]
        return pd.DataFrame({"measured": test[TARGET].to_numpy(float),
                             "nll_fp": fp.to_numpy(float),
                             "forest": fit.predict(test[features].to_numpy(float))},
                            index=test.index)

    preds = leave_one_group_out(X, X[SCHEMES[scheme]].astype(str), f"leave-one-{scheme}-out",
                                forest, law_cfg)
    models = ["forest", *LAW_PREDICTORS]
    return CVResult(scheme, preds, _metrics(preds, models), _per_group(preds, models), features)


def leave_one_group_out(X: pd.DataFrame, groups: pd.Series, what: str,
                        predict: Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame],
                        law_cfg: StudyFitConfig) -> pd.DataFrame:
    """Each group's rows predicted by ``predict(train, test)`` (a frame indexed like test) and
    by every law fitted on the other groups; one frame with a ``group`` column."""
    if groups.nunique() < 2:
        raise AnalysisError(f"{what} needs >= 2 values, got {sorted(groups.unique())}")
    parts = []
    for g in sorted(groups.unique()):
        test, train = X[groups == g], X[groups != g]
        part = predict(train, test)
        part.insert(0, "group", g)
        for law, pred in law_predictions(train, test, law_cfg).items():
            part[law] = pred
        parts.append(part)
    return pd.concat(parts)


def r2_score(y: np.ndarray, p: np.ndarray) -> float:
    return float(1 - np.sum((y - p) ** 2) / np.sum((y - np.mean(y)) ** 2))


def _metrics(preds: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    rows = []
    for m in models:
        ok = preds[m].notna()
        y, p, fp = preds["measured"][ok], preds[m][ok], preds["nll_fp"][ok]
        row = {"predictor": m, "coverage": float(ok.mean())}
        if ok.sum() >= 2:
            row |= {"r2_dnll": r2_score(y, p), "mae_dnll": float(np.mean(np.abs(y - p))),
                    "r2_nll": r2_score(y + fp, p + fp)}
        rows.append(row)
    return pd.DataFrame(rows, columns=["predictor", "coverage", "r2_dnll", "mae_dnll", "r2_nll"])


def _per_group(preds: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    err = preds[models].sub(preds["measured"], axis=0).abs()
    return err.groupby(preds["group"]).mean()


# ---- persistence ------------------------------------------------------------------------
# A saved predictor is a JSON file: the forest's settings, the sha256 of its training records
# and a fingerprint of its predictions. Loading refits the forest on the study's records and
# checks both hashes. Why refit rather than store the trees: a pickle (joblib) runs code on
# load, and the trees' arrays are megabytes of derived data; the store is the source of truth,
# the fit is deterministic (fixed seed) and takes seconds, and the prediction fingerprint
# catches a scikit-learn whose forest differs. No pickle is ever read.

SAVE_KIND = "ptqscale-predictor"
SAVE_VERSION = 1


def predictions_sha256(predictor: Predictor, rows: pd.DataFrame) -> str:
    """sha256 of the forest's predictions on its training rows (12 significant digits)."""
    X = add_features(rows, predictor.methods)
    out = predictor.predict(X).to_numpy(float)
    return hashlib.sha256(np.array2string(out, precision=12, threshold=out.size + 1)
                          .encode()).hexdigest()


def save(predictor: Predictor, path: str | os.PathLike, frame: pd.DataFrame) -> Path:
    """Write ``predictor`` (trained on ``frame``) as JSON: its settings and hashes, no trees."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": SAVE_KIND, "version": SAVE_VERSION, "config": asdict(predictor.cfg),
            "records_sha256": predictor.records_sha256,
            "predictions_sha256": predictions_sha256(predictor,
                                                     training_rows(frame, predictor.cfg.target)),
            "features": predictor.features, "dropped": predictor.dropped,
            "methods": predictor.methods, "sklearn": sklearn.__version__}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)
    return path


def _read_saved(path: Path) -> dict:
    raw = path.read_bytes()
    if raw[:1] == b"\x80":  # the PROTO opcode every pickle since protocol 2 starts with
        raise AnalysisError(f"{path} is a pickle (e.g. joblib); pickles can run code when "
                            "loaded and are refused: save the predictor with ptqscale "
                            "(a JSON file) or delete the file to retrain")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AnalysisError(f"{path} is not a saved predictor (expected the JSON file that "
                            "ptqscale-predict --predictor writes); delete it to retrain") from None
    if not isinstance(meta, dict) or meta.get("kind") != SAVE_KIND:
        raise AnalysisError(f"{path} is JSON but not a saved ptqscale predictor "
                            f"(no \"kind\": \"{SAVE_KIND}\")")
    if meta.get("version") != SAVE_VERSION:
        raise AnalysisError(f"{path}: saved-predictor version {meta.get('version')!r}, "
                            f"this ptqscale reads version {SAVE_VERSION}; delete it to retrain")
    return meta


def load(path: str | os.PathLike, frame: pd.DataFrame) -> Predictor:
    """Refit the predictor saved at ``path`` on ``frame``, checking it is the same forest.

    Refused: a pickle (never unpickled), other records than it was trained on, or a refit
    whose predictions differ (another scikit-learn version, say).
    """
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"no saved predictor at {path}")
    meta = _read_saved(path)
    cfg_saved = meta.get("config") or {}
    rows = training_rows(frame, cfg_saved.get("target", TARGET))
    digest = records_sha256(rows)
    if digest != meta["records_sha256"]:
        raise AnalysisError(
            f"the predictor at {path} was trained on other records "
            f"(sha256 {meta['records_sha256'][:12]}, study now {digest[:12]}); retrain it")
    try:
        cfg = PredictorConfig(**meta["config"])
    except TypeError as e:
        raise AnalysisError(f"{path}: unreadable predictor settings ({e})") from None
    predictor = train_predictor(frame, cfg)
    if predictions_sha256(predictor, rows) != meta["predictions_sha256"]:
        raise AnalysisError(
            f"the predictor at {path} refits to different predictions (saved with "
            f"scikit-learn {meta.get('sklearn')}, this is {sklearn.__version__}); retrain it")
    return predictor
