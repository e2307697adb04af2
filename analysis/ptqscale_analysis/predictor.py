"""A random forest that predicts post-PTQ dNLL (and NLL = NLL_fp + dNLL) from features.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.ensemble import RandomForestRegressor

from ptqscale_analysis.errors import AnalysisError
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


def training_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Quantized rows (the baseline has dNLL = 0 by construction) with a known dNLL."""
    rows = frame[~frame["is_baseline"] & frame[TARGET].notna()]
    if rows.empty:
        raise AnalysisError("no quantized records with a dNLL to learn from")
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


# Landscape columns that describe the model (or the job's noise-equivalent prediction);
# the rest of that record group is bookkeeping (costs, budgets, standard errors).
_LANDSCAPE_FEATURE = re.compile(r"^landscape\.(kappa|kappa_h|kappa_ratio|s_star_db|hessian_trace|"
                                r"top_eigenvalue|noise_equivalent_dnll|dnll_at_[0-9.]+db)$")


def candidate_features(frame: pd.DataFrame, methods: list[str]) -> list[str]:
    landscape = sorted(c for c in frame.columns if _LANDSCAPE_FEATURE.match(c))
    return [*MODEL_FEATURES, *landscape, *FORMAT_FEATURES, *(f"method={m}" for m in methods)]


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
    rows = training_rows(frame)
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
    rows = training_rows(frame)
    methods = sorted(rows["method.name"].unique())
    X = add_features(rows, methods)
    features, _ = select_features(X, methods)
    groups = X[SCHEMES[scheme]].astype(str)
    if groups.nunique() < 2:
        raise AnalysisError(f"leave-one-{scheme}-out needs >= 2 values of {SCHEMES[scheme]}, "
                            f"got {sorted(groups.unique())}")
    parts = []
    for g in sorted(groups.unique()):
        test, train = X[groups == g], X[groups != g]
        forest = _forest(cfg).fit(train[features].to_numpy(float), train[TARGET].to_numpy(float))
        part = pd.DataFrame({"group": g, "measured": test[TARGET].to_numpy(float),
                             "nll_fp": test["metrics.nll_fp"].to_numpy(float),
                             "forest": forest.predict(test[features].to_numpy(float))},
                            index=test.index)
        for law, pred in law_predictions(train, test, law_cfg).items():
            part[law] = pred
        parts.append(part)
    preds = pd.concat(parts)
    models = ["forest", *LAW_PREDICTORS]
    return CVResult(scheme, preds, _metrics(preds, models), _per_group(preds, models), features)


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

def save(predictor: Predictor, path: str | os.PathLike) -> Path:
    """Write the predictor (joblib) and a JSON sidecar with the training records' sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(predictor, path)
    meta = {"records_sha256": predictor.records_sha256, "features": predictor.features,
            "dropped": predictor.dropped, "methods": predictor.methods,
            "config": asdict(predictor.cfg), "sklearn": sklearn.__version__}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return path


def load(path: str | os.PathLike, frame: pd.DataFrame | None = None) -> Predictor:
    """Read a saved predictor; with ``frame``, check it was trained on exactly its records.

    joblib files are pickles: load only predictors you wrote yourself.
    """
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"no saved predictor at {path}")
    predictor = joblib.load(path)
    if frame is not None:
        digest = records_sha256(training_rows(frame))
        if digest != predictor.records_sha256:
            raise AnalysisError(
                f"the predictor at {path} was trained on other records "
                f"(sha256 {predictor.records_sha256[:12]}, study now {digest[:12]}); retrain it")
    return predictor
