"""Pareto frontier and budget answers against brute force; predictions for known and new."""

import numpy as np
import pandas as pd
import pytest

from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.load import load_study
from ptqscale_analysis.predictor import PredictorConfig, train_predictor
from ptqscale_analysis.queries import (
    best_under_budget,
    pareto_frontier,
    parse_bytes,
    predict_nll,
)


@pytest.fixture(scope="module")
def small(small_root):
    return load_study(small_root, "small")


@pytest.fixture(scope="module")
def pred(small):
    return train_predictor(small, PredictorConfig(n_estimators=20))


def test_pareto_frontier_is_the_brute_force_set(small):
    front = pareto_frontier(small)
    b, y = small["model_bytes"].to_numpy(), small["metrics.nll"].to_numpy()
    dominated = [((b <= b[i]) & (y <= y[i]) & ((b < b[i]) | (y < y[i]))).any() for i in range(len(b))]
    assert set(front.index) == set(small.index[~np.array(dominated)])
    assert front["model_bytes"].is_monotonic_increasing
    assert front["metrics.nll"].is_monotonic_decreasing


def test_best_under_budget_measured_and_predicted(small, pred):
    with pytest.raises(AnalysisError, match="not comparable"):  # two families (tokenizers)
        best_under_budget(small, 1e12, pred)
    small = small[small["model.family"] == "zoo"]
    budget = small["model_bytes"].median()
    ans = best_under_budget(small, budget, pred)
    under = small[small["model_bytes"] <= budget]
    assert ans.measured["metrics.nll"] == under["metrics.nll"].min()
    assert ans.predicted["model_bytes"] <= budget
    assert ans.predicted["value"] == ans.candidates.query("model_bytes <= @budget")["value"].min()
    # candidate bytes follow the rule: quantized at effective bits, the rest at 16 bits
    row = ans.candidates.query("`format.name` == 'mxfp4'").iloc[0]
    m = small[small["model.name"] == row["model.name"]].iloc[0]
    q = m["params.quantizable"]  # the records' name; never params.total
    assert q < m["params.total"]
    assert row["model_bytes"] == pytest.approx(q * 4.25 / 8 + (m["params.total"] - q) * 2)
    with pytest.raises(AnalysisError, match="nothing fits in 10 bytes"):
        best_under_budget(small, 10, pred)


def test_predict_known_model_and_given_features(small, pred):
    p = predict_nll(pred, small, "mxfp4", "gptq", model="zoo-8m")
    assert p.measured_nll == pytest.approx(
        small.query("`model.name` == 'zoo-8m' and `format.name` == 'mxfp4' and "
                    "`method.name` == 'gptq'")["metrics.nll"].iloc[0])
    assert p.nll_low <= p.nll <= p.nll_high and abs(p.nll - p.measured_nll) < 0.05
    given = predict_nll(pred, small, "mxfp4", "gptq",
                        features={"params.total": 2e7, "metrics.nll_fp": 3.0,
                                  "landscape.kappa": 0.5})
    assert given.nll > 3.0 and given.measured_nll is None
    with pytest.raises(AnalysisError, match="missing model features.*landscape.kappa"):
        predict_nll(pred, small, "mxfp4", "gptq",
                    features={"params.total": 2e7, "metrics.nll_fp": 3.0})


def test_unseen_format_method_model_are_refused(small, pred):
    with pytest.raises(AnalysisError, match="format 'nf4' was never seen.*int4_g128"):
        predict_nll(pred, small, "nf4", "rtn", model="zoo-8m")
    with pytest.raises(AnalysisError, match="method 'awq' was never seen"):
        predict_nll(pred, small, "mxfp4", "awq", model="zoo-8m")
    with pytest.raises(AnalysisError, match="model 'zoo-7b' is not in the study"):
        predict_nll(pred, small, "mxfp4", "rtn", model="zoo-7b")


@pytest.mark.parametrize("text,value", [("500MB", 5e8), ("1.5GiB", 1.5 * 2**30), ("2e9", 2e9),
                                        ("123", 123.0), ("4 kib", 4096.0)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "5 parsecs", "0"])
def test_parse_bytes_refuses(text):
    with pytest.raises(AnalysisError, match="budget"):
        parse_bytes(text)


def test_an_evaluation_protocol_that_varies_splits_queries_and_panels(small):
    from ptqscale_analysis import plots
    from ptqscale_analysis.queries import split

    zoo = small[small["model.family"] == "zoo"]
    two = pd.concat([zoo.assign(**{"eval.seqlen": 512}),
                     zoo.assign(**{"eval.seqlen": 2048, "metrics.nll": zoo["metrics.nll"] - 0.3})],
                    ignore_index=True)
    groups = split(two)
    assert [labels for labels, _ in groups] == [{"eval.seqlen": "512"}, {"eval.seqlen": "2048"}]
    assert all(len(part) == len(zoo) for _, part in groups)
    fig = plots.plot_pareto(two)
    assert sorted(ax.get_gid() for ax in fig.axes if ax.get_gid()) == [
        "model.family=zoo|eval.seqlen=2048", "model.family=zoo|eval.seqlen=512"]


def test_pareto_frontier_follows_the_direction_the_records_declare():
    from ptqscale_analysis.load import higher_is_better

    frame = pd.DataFrame({"model_bytes": [1.0, 2.0, 3.0, 4.0],
                          "metrics.acc": [0.5, 0.4, 0.7, 0.9],
                          "metric_info.acc.headline": "acc",
                          "metric_info.acc.higher_is_better": True})
    assert higher_is_better(frame, "metrics.acc")
    assert pareto_frontier(frame, y="metrics.acc")["model_bytes"].tolist() == [1.0, 3.0, 4.0]
    # undeclared (records before metric_info): a loss, smaller is better
    old = frame.drop(columns=["metric_info.acc.headline", "metric_info.acc.higher_is_better"])
    assert not higher_is_better(old, "metrics.acc")
    assert pareto_frontier(old, y="metrics.acc")["model_bytes"].tolist() == [1.0, 2.0]
    frame.loc[0, "metric_info.acc.higher_is_better"] = False
    with pytest.raises(AnalysisError, match="disagree"):
        higher_is_better(frame, "metrics.acc")
