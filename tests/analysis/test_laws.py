"""Each law recovers its own parameters from noisy synthetic data (truth inside the CIs)."""

import numpy as np
import pytest
from scipy.optimize import check_grad

from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.laws import (
    FP,
    NOISE_SAT,
    PRECISION,
    FitConfig,
    _objective,
    fit_format_power_law,
    fit_fp_law,
    fit_noise_law,
    fit_noise_law_saturating,
    fit_precision_law,
)

CFG = FitConfig(n_boot=100, seed=0)
SIZES = np.geomspace(1e6, 1e9, 7)


def _grid(rng, levels):
    n = np.repeat(SIZES, len(levels))
    x = np.tile(levels, len(SIZES))
    return n, x, rng


def _assert_recovered(fit, truth):
    assert fit.converged, fit.notes
    for name, value in truth.items():
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, f"{name}: true {value} outside [{lo}, {hi}] (fit {fit.params})"
        assert lo < fit.params[name] < hi or np.isclose(lo, hi)


def test_fp_law_recovers_parameters():
    rng = np.random.default_rng(1)
    truth = {"E": 1.8, "A": 400.0, "alpha": 0.35}
    nll = (truth["E"] + truth["A"] * SIZES ** -truth["alpha"]) * np.exp(rng.normal(0, 0.003, 7))
    fit = fit_fp_law(SIZES, nll, CFG)
    _assert_recovered(fit, truth)
    assert fit.n == 7 and fit.residuals.shape == (7,)


def test_noise_law_recovers_parameters():
    n, s, rng = _grid(np.random.default_rng(2), np.linspace(10, 40, 6))
    truth = {"K": 300.0, "gamma": 0.4}
    dnll = truth["K"] * n ** -truth["gamma"] * 10 ** (-s / 10) * np.exp(rng.normal(0, 0.1, n.size))
    _assert_recovered(fit_noise_law(n, s, dnll, CFG), truth)


def test_saturating_noise_law_recovers_parameters():
    n, s, rng = _grid(np.random.default_rng(3), np.linspace(-5, 30, 8))
    truth = {"K": 300.0, "gamma": 0.4, "S": 3.0}
    x = truth["K"] * n ** -truth["gamma"] * 10 ** (-s / 10)
    dnll = x / (1 + x / truth["S"]) * np.exp(rng.normal(0, 0.05, n.size))
    fit = fit_noise_law_saturating(n, s, dnll, CFG)
    _assert_recovered(fit, truth)
    assert fit.predict(n=1e6, sqnr=-60.0) == pytest.approx(truth["S"], rel=0.2)  # saturates


def test_a_law_pinned_at_a_bound_is_not_converged():
    # pure noise law, far from saturation: S runs to the top of its box (e^15)
    n, s, rng = _grid(np.random.default_rng(0), np.linspace(15, 40, 6))
    dnll = 300.0 * n ** -0.4 * 10 ** (-s / 10) * np.exp(rng.normal(0, 0.05, n.size))
    fit = fit_noise_law_saturating(n, s, dnll, FitConfig(n_boot=0))
    assert fit.theta[2] == pytest.approx(NOISE_SAT.bounds[2][1])
    assert not fit.converged
    assert any("S sits at its bound" in note for note in fit.notes)
    assert fit_noise_law(n, s, dnll, FitConfig(n_boot=0)).converged  # the same data, no bound


def test_precision_law_recovers_parameters():
    n, bits, rng = _grid(np.random.default_rng(4), np.array([3.0, 4.25, 4.5, 6.25, 8.25]))
    truth = {"C": 50.0, "gamma_N": 0.3, "gamma_P": 1.2}
    dnll = (truth["C"] * n ** -truth["gamma_N"] * np.exp(-bits / truth["gamma_P"])
            * np.exp(rng.normal(0, 0.1, n.size)))
    _assert_recovered(fit_precision_law(n, bits, dnll, CFG), truth)


def test_format_power_law_recovers_parameters():
    rng = np.random.default_rng(5)
    truth = {"a": 5.0, "b": 0.3}
    dnll = truth["a"] * SIZES ** -truth["b"] * np.exp(rng.normal(0, 0.05, SIZES.size))
    _assert_recovered(fit_format_power_law(SIZES, dnll, CFG), truth)


def test_cases_bootstrap_also_covers_truth():
    n, s, rng = _grid(np.random.default_rng(6), np.linspace(10, 40, 6))
    dnll = 300.0 * n ** -0.4 * 10 ** (-s / 10) * np.exp(rng.normal(0, 0.1, n.size))
    fit = fit_noise_law(n, s, dnll, FitConfig(n_boot=100, bootstrap="cases"))
    _assert_recovered(fit, {"K": 300.0, "gamma": 0.4})


@pytest.mark.parametrize("spec,X,theta", [
    (FP, {"n": SIZES}, np.array([0.5, 6.0, 0.3])),
    (NOISE_SAT, {"n": SIZES, "sqnr": np.linspace(0, 30, 7)}, np.array([5.0, 0.4, 0.7])),
    (PRECISION, {"n": SIZES, "bits": np.linspace(3, 8, 7)}, np.array([4.0, 0.3, 0.1])),
])
def test_analytic_gradient_matches_finite_differences(spec, X, theta):
    log_y = spec.log_model(theta + 0.05, X) + np.random.default_rng(0).normal(0, 0.2, 7)
    obj = _objective(spec, X, log_y, delta=0.1)
    err = check_grad(lambda t: obj(t)[0], lambda t: obj(t)[1], theta)
    assert err < 1e-5 * max(1.0, np.linalg.norm(obj(theta)[1]))


def test_one_size_cannot_fit_a_size_law():
    with pytest.raises(AnalysisError, match="needs >= 2 distinct model sizes, got 1"):
        fit_noise_law(np.full(5, 1e6), np.arange(5.0), np.ones(5))
    with pytest.raises(AnalysisError, match="needs >= 4 distinct model sizes"):
        fit_fp_law(SIZES[:3], np.array([3.0, 2.5, 2.2]))


def test_nonpositive_values_are_refused_with_a_reason():
    with pytest.raises(AnalysisError, match="must be > 0"):
        fit_format_power_law(SIZES, np.r_[np.ones(6), -1e-4])
    with pytest.raises(AnalysisError, match="2 distinct effective bit widths"):
        fit_precision_law(SIZES, np.full(7, 4.0), np.ones(7))
    with pytest.raises(AnalysisError, match="bootstrap must be one of"):
        FitConfig(bootstrap="jackknife")
