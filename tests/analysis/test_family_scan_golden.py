"""The committed family_scan records (results/family_scan, measured on an H100) as golden data.

These pin what the study found (results/family_scan/findings.md); a change in the reader, the
derived columns or the laws that moves them fails here. Values were computed from the committed
records: 416 jobs, seven family members (200k ... 20m) plus stories260K, 52 jobs each.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from sklearn.linear_model import QuantileRegressor

from ptqscale_analysis.laws import FitConfig, fit_fp_law, fit_noise_law, fit_noise_law_saturating
from ptqscale_analysis.load import load_study
from ptqscale_analysis.report import ReportConfig, write_report
from ptqscale_analysis.study_fits import StudyFitConfig

RESULTS = Path(__file__).resolve().parents[2] / "results"
FAMILY = "gutenberg-llama"
SIZES = ("200k", "500k", "1m", "2m", "4m", "8m", "20m")


@pytest.fixture(scope="module")
def study():
    return load_study(RESULTS, "family_scan")


def test_the_committed_records_load(study):
    assert len(study) == 416
    counts = study["model.name"].value_counts()
    # 13 formats x 2 methods x 2 corpora per model
    assert counts.to_dict() == {**{f"{FAMILY}-{s}": 52 for s in SIZES}, "stories260k": 52}
    assert set(study["method.name"]) == {"rtn", "gptq"}
    assert study["metrics.nll"].notna().all()


@pytest.mark.parametrize("corpus", ["gutenberg", "wikitext2"])
def test_full_precision_nll_falls_with_size(study, corpus):
    fam = study[(study["model.family"] == FAMILY) & (study["data.name"] == corpus)]
    fp = fam.drop_duplicates("model.name").sort_values("params.blocks")["metrics.nll_fp"]
    assert np.all(np.diff(fp.to_numpy()) < 0)


def test_fp_law_on_gutenberg(study):
    fam = study[(study["model.family"] == FAMILY) & (study["data.name"] == "gutenberg")]
    models = fam.drop_duplicates("model.name")
    fit = fit_fp_law(models["params.blocks"].to_numpy(float),
                     models["metrics.nll_fp"].to_numpy(float), FitConfig(n_boot=0))
    assert fit.converged
    # scipy least_squares on the log residuals (no Huber) gives 0.300 on the same 7 points
    assert fit.params["alpha"] == pytest.approx(0.3049, abs=0.01)


def _landscape(study, corpus: str):
    fam = study[(study["model.family"] == FAMILY) & (study["data.name"] == corpus)]
    return fam.drop_duplicates("model.name").sort_values("params.blocks")


@pytest.mark.parametrize("corpus", ["gutenberg", "wikitext2"])
def test_the_basin_flattens_with_size(study, corpus):
    kappa = _landscape(study, corpus)["landscape.kappa"].to_numpy()
    assert len(kappa) == len(SIZES)
    assert np.all(np.diff(kappa) < 0)
    assert kappa[0] > 7 * kappa[-1]   # 5.44 -> 0.74 (Gutenberg), 3.08 -> 0.40 (WikiText-2)


def test_weighted_hessian_trace_tracks_kappa(study):
    ratios = np.concatenate([(m["landscape.kappa_h"] / m["landscape.kappa"]).to_numpy()
                             for m in (_landscape(study, c) for c in ("gutenberg", "wikitext2"))])
    assert len(ratios) == 2 * len(SIZES)
    assert np.all((ratios > 0.8) & (ratios < 1.2))   # 0.81 ... 1.10


@pytest.mark.parametrize("method, gamma", [("rtn", 0.4013), ("gptq", 0.4085)])
def test_noise_law_exponent_on_gutenberg(study, method, gamma):
    q = study[(study["model.family"] == FAMILY) & (study["method.name"] == method)
              & (study["data.name"] == "gutenberg") & ~study["is_baseline"] & (study["dnll"] > 0)]
    n, sqnr, dnll = (q[c].to_numpy(float) for c in ("params.blocks", "metrics.weight_sqnr_db",
                                                      "dnll"))
    fit = fit_noise_law(n, sqnr, dnll, FitConfig(n_boot=0))
    assert fit.converged
    assert fit.params["gamma"] == pytest.approx(gamma, abs=0.01)
    # independent reference: Huber with delta 0.001 on log values is close to least absolute
    # deviations, i.e. median regression of log dNLL + SQNR ln10/10 on -log N
    y = np.log(dnll) + sqnr / 10 * np.log(10)
    lad = QuantileRegressor(quantile=0.5, alpha=0, solver="highs").fit(-np.log(n)[:, None], y)
    assert fit.params["gamma"] == pytest.approx(lad.coef_[0], abs=0.01)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_saturating_law_at_its_bound_is_not_converged_on_gutenberg(study, method):
    # Gutenberg dNLL never saturates over the measured SQNR range: S runs to its ceiling.
    q = study[(study["model.family"] == FAMILY) & (study["method.name"] == method)
              & (study["data.name"] == "gutenberg") & ~study["is_baseline"] & (study["dnll"] > 0)]
    fit = fit_noise_law_saturating(*(q[c].to_numpy(float) for c in (
        "params.blocks", "metrics.weight_sqnr_db", "dnll")), FitConfig(n_boot=0))
    assert fit.theta[2] == pytest.approx(15.0) and not fit.converged


@pytest.mark.slow
def test_report_renders_on_the_committed_study(tmp_path):
    cfg = ReportConfig(fit=StudyFitConfig(fit=FitConfig(n_boot=20)))
    md = write_report(RESULTS, "family_scan", tmp_path, cfg)
    text = md.read_text()
    assert "What the study found" in text and "Leave-one-size-out" in text
    pngs = sorted((tmp_path / "figures").glob("*.png"))
    assert len(pngs) >= 5
    for png in pngs:
        assert mpimg.imread(png).std() > 0
