"""Grouped cross-validation against a hand-written loop; persistence with the records hash."""

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestRegressor
from sklearn.metrics import mean_absolute_error, r2_score

from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.laws import FitConfig, fit_noise_law
from ptqscale_analysis.load import load_study
from ptqscale_analysis.predictor import (
    PredictorConfig,
    add_features,
    cross_validate,
    load,
    save,
    train_predictor,
)
from ptqscale_analysis.study_fits import StudyFitConfig

CFG = PredictorConfig(n_estimators=12, seed=3)
LAWS = StudyFitConfig(fit=FitConfig(n_boot=0))


@pytest.fixture(scope="module")
def small(small_root):
    return load_study(small_root, "small")


def test_features_present_everywhere_are_used(small):
    pred = train_predictor(small, CFG)
    assert "landscape.kappa" in pred.features and "rtn_sqnr_db" in pred.features
    assert pred.dropped == ["landscape.s_star_db"]  # measured for one family only
    assert not any("cost" in f for f in pred.features + pred.dropped)
    assert pred.importances().sum() == pytest.approx(1.0)


@pytest.mark.parametrize("scheme,column", [("family", "model.family"), ("size", "model.size")])
def test_grouped_cv_matches_a_hand_loop(small, scheme, column):
    cv = cross_validate(small, scheme, CFG, LAWS)
    rows = small[~small["is_baseline"]]
    X = add_features(rows, ["gptq", "rtn"])
    manual = pd.Series(np.nan, index=rows.index)
    for g in rows[column].unique():
        test, train = X[X[column] == g], X[X[column] != g]
        rf = RandomForestRegressor(n_estimators=12, random_state=3, max_features=1.0)
        rf.fit(train[cv.features].to_numpy(float), train["dnll"].to_numpy(float))
        manual[test.index] = rf.predict(test[cv.features].to_numpy(float))
    np.testing.assert_allclose(cv.predictions["forest"], manual[cv.predictions.index])
    y = rows.loc[cv.predictions.index, "dnll"]
    forest = cv.metrics.set_index("predictor").loc["forest"]
    assert forest["r2_dnll"] == pytest.approx(r2_score(y, manual[y.index]))
    assert forest["mae_dnll"] == pytest.approx(mean_absolute_error(y, manual[y.index]))
    fp = rows.loc[y.index, "metrics.nll_fp"]
    assert forest["r2_nll"] == pytest.approx(r2_score(y + fp, manual[y.index] + fp))
    per_group = (manual - rows["dnll"]).abs().groupby(rows[column].astype(str)).mean()
    np.testing.assert_allclose(cv.per_group["forest"], per_group[cv.per_group.index])


def test_cv_law_column_is_the_law_fitted_on_the_training_fold(small):
    cv = cross_validate(small, "family", CFG, LAWS)
    q = small[~small["is_baseline"]]
    train = q[(q["model.family"] != "zoo") & (q["method.name"] == "rtn")]
    test = q[(q["model.family"] == "zoo") & (q["method.name"] == "rtn")]
    fit = fit_noise_law(train["params.blocks"], train["metrics.weight_sqnr_db"], train["dnll"],
                        FitConfig(n_boot=0))
    expected = fit.predict(n=test["params.blocks"], sqnr=test["metrics.weight_sqnr_db"])
    np.testing.assert_allclose(cv.predictions.loc[test.index, "noise"], expected, rtol=1e-6)


def test_cv_needs_two_groups(small):
    one = small[small["model.family"] == "zoo"]
    with pytest.raises(AnalysisError, match="leave-one-family-out needs >= 2 values"):
        cross_validate(one, "family", CFG, LAWS)
    with pytest.raises(AnalysisError, match="scheme must be one of"):
        cross_validate(small, "format", CFG, LAWS)


def test_save_load_checks_the_records_hash(small, tmp_path):
    pred = train_predictor(small, CFG)
    path = save(pred, tmp_path / "rf.json", small)
    saved = json.loads(path.read_text())  # plain JSON: settings and hashes, no trees
    assert saved["records_sha256"] == pred.records_sha256 and saved["config"]["seed"] == 3
    again = load(path, small)
    X = add_features(small[~small["is_baseline"]], pred.methods)
    pd.testing.assert_frame_equal(again.predict(X), pred.predict(X))
    changed = small.copy()
    changed.loc[changed.index[0], "metrics.nll"] += 0.01
    with pytest.raises(AnalysisError, match="trained on other records"):
        load(path, changed)
    saved["predictions_sha256"] = "0" * 64  # a refit that predicts otherwise is refused
    path.write_text(json.dumps(saved))
    with pytest.raises(AnalysisError, match="refits to different predictions"):
        load(path, small)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_pickle_is_refused_and_never_unpickled(small, tmp_path, monkeypatch, protocol):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "rf.joblib"
    path.write_bytes(pickle.dumps(_Boom(), protocol=protocol))
    with pytest.raises(AnalysisError, match="is a pickle.*refused"):
        load(path, small)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("text, match", [("not json", "not a saved predictor"),
                                         ('{"kind": "other"}', "not a saved ptqscale"),
                                         ('{"kind": "ptqscale-predictor", "version": 9}',
                                          "version 9")])
def test_other_files_are_refused(small, tmp_path, text, match):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(AnalysisError, match=match):
        load(path, small)


def test_no_pickle_loader_in_the_analysis_package():
    src = Path(__file__).resolve().parents[2] / "analysis" / "ptqscale_analysis"
    text = "\n".join(p.read_text() for p in src.glob("*.py"))
    assert not re.search(r"joblib\.load|pickle\.load|import pickle|import joblib", text)


def test_interval_brackets_the_mean(small):
    pred = train_predictor(small, CFG)
    out = pred.predict(add_features(small[~small["is_baseline"]], pred.methods))
    assert (out["dnll_low"] <= out["dnll"]).all() and (out["dnll"] <= out["dnll_high"]).all()
