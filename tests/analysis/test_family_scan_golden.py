"""The committed family_scan records (results/family_scan, measured on an H100) as golden data.

These pin what the study found; a change in the reader, the derived columns or the laws that
moves them fails here. Values were computed from the committed records when they were added.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from ptqscale_analysis.laws import FitConfig, fit_fp_law, fit_noise_law
from ptqscale_analysis.load import load_study
from ptqscale_analysis.report import ReportConfig, write_report
from ptqscale_analysis.study_fits import StudyFitConfig

RESULTS = Path(__file__).resolve().parents[2] / "results"
FAMILY = "gutenberg-llama"


@pytest.fixture(scope="module")
def study():
    return load_study(RESULTS, "family_scan")


def test_the_committed_records_load(study):
    assert len(study) == 364
    assert set(study["model.name"]) == {f"{FAMILY}-{s}" for s in ("200k", "500k", "1m", "2m",
                                                                   "4m", "8m")} | {"stories260k"}
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
    assert fit.params["alpha"] == pytest.approx(0.2685, abs=0.01)


def test_the_basin_flattens_with_size(study):
    fam = study[(study["model.family"] == FAMILY) & (study["data.name"] == "gutenberg")]
    kappa = fam.drop_duplicates("model.name").sort_values("params.blocks")["landscape.kappa"]
    assert kappa.iloc[0] > 4 * kappa.iloc[-1]   # 5.44 -> 1.01 across the family


def test_noise_law_exponent_for_rtn(study):
    q = study[(study["model.family"] == FAMILY) & (study["method.name"] == "rtn")
              & ~study["is_baseline"] & (study["dnll"] > 0)]
    fit = fit_noise_law(q["params.blocks"].to_numpy(float), q["metrics.weight_sqnr_db"].to_numpy(
        float), q["dnll"].to_numpy(float), FitConfig(n_boot=0))
    assert fit.converged and 0.3 < fit.params["gamma"] < 0.55


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
