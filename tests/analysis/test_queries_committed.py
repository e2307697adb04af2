"""Queries on the committed family_scan (two corpora, two tokenizers): bytes and splits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ptqscale_analysis.cli import pareto_main, predict_main
from ptqscale_analysis.load import load_study
from ptqscale_analysis.predictor import PredictorConfig, train_predictor
from ptqscale_analysis.queries import best_under_budget, candidate_table, select, split

RESULTS = Path(__file__).resolve().parents[2] / "results"
MODEL = "gutenberg-llama-2m"


@pytest.fixture(scope="module")
def study():
    return load_study(RESULTS, "family_scan")


@pytest.fixture(scope="module")
def pred(study):
    return train_predictor(study, PredictorConfig(n_estimators=20))


def test_candidate_bytes_are_the_recorded_model_bytes(study, pred):
    part = select(study, data="wikitext2", family="gutenberg-llama")
    cand = candidate_table(part, pred).set_index(["model.name", "format.name", "method.name"])
    rec = part[~part["is_baseline"]].set_index(["model.name", "format.name", "method.name"])
    # the runner's metrics.model_bytes: quantized weights at their bits, the rest at 16 bits
    assert cand.loc[rec.index, "model_bytes"].to_numpy() == pytest.approx(
        rec["metrics.model_bytes"].to_numpy(float))
    q, total = rec["params.quantizable"], rec["params.total"]
    assert (q < total).all()  # the embedding is not quantized
    assert rec["model_bytes"].to_numpy() == pytest.approx(
        (q * rec["format.bits_per_weight"] / 8 + (total - q) * 2).to_numpy(float))


def test_a_2mb_budget_is_met_in_every_group(study, pred, capsys):
    for _, part in split(study):
        ans = best_under_budget(part, 2e6, pred)
        assert ans.measured["model_bytes"] <= 2e6 and ans.predicted["model_bytes"] <= 2e6
    assert pareto_main(["--results", str(RESULTS), "--study", "family_scan", "--budget", "2MB",
                        "--n-estimators", "20"]) == 0
    out = capsys.readouterr().out
    sizes = [float(b) for b in re.findall(r"NLL [0-9.]+, ([0-9.e+]+) bytes", out)]
    assert len(sizes) == 8 and max(sizes) <= 2e6  # measured + predicted, 4 groups
    assert out.count("== data=") == 4


@pytest.mark.parametrize("corpus", ["wikitext2", "gutenberg"])
def test_predict_data_uses_that_corpus(study, corpus, capsys):
    assert predict_main(["--results", str(RESULTS), "--study", "family_scan", "--model", MODEL,
                         "--format", "mxfp4", "--method", "gptq", "--data", corpus,
                         "--n-estimators", "20"]) == 0
    out = capsys.readouterr().out
    rows = study[(study["model.name"] == MODEL) & (study["data.name"] == corpus)]
    fp = float(re.search(r"full precision ([0-9.]+)", out).group(1))
    measured = float(re.search(r"measured on (\w+): ([0-9.]+)", out).group(2))
    assert re.search(r"measured on (\w+)", out).group(1) == corpus
    assert fp == pytest.approx(rows["metrics.nll_fp"].iloc[0], abs=1e-4)
    job = rows[(rows["format.name"] == "mxfp4") & (rows["method.name"] == "gptq")]
    assert measured == pytest.approx(job["metrics.nll"].iloc[0], abs=1e-4)
    assert out.count("full precision") == 1


def test_predict_without_data_answers_per_corpus(capsys):
    assert predict_main(["--results", str(RESULTS), "--study", "family_scan", "--model", MODEL,
                         "--format", "mxfp4", "--method", "gptq", "--n-estimators", "20"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"measured on (\w+)", out) == ["gutenberg", "wikitext2"]


def test_pareto_on_an_activation_study_answers_per_scheme(capsys):
    assert pareto_main(["--results", str(RESULTS), "--study", "crossquant", "--budget", "5MB",
                        "--data", "gutenberg", "--activations", "int8 per_token"]) == 0
    out = capsys.readouterr().out
    assert "measured answers only" in out and "best measured:" in out
    assert out.count("== ") == 0  # one group: corpus, family and scheme all fixed


def test_a_pickle_predictor_is_refused_by_the_cli(tmp_path, capsys):
    import pickle

    path = tmp_path / "rf.pkl"
    path.write_bytes(pickle.dumps({"forest": 1}))
    assert predict_main(["--results", str(RESULTS), "--study", "awq", "--model",
                         "gutenberg-llama-1m", "--format", "int4_g128", "--method", "awq",
                         "--predictor", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a pickle" in err and "Traceback" not in err
