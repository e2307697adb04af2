"""Scaling laws of full-precision and post-quantization NLL, fitted robustly.

Every law is a model of ``log y`` (``log_<law>``), fitted by :func:`_fit`: Huber loss on
log residuals, L-BFGS-B from a grid of starting points, the best start kept, then a
bootstrap for confidence intervals (Hoffmann et al. 2022, Appendix D.2, for the loss and
the multi-start; residual bootstrap by default because studies have few sizes).

Laws (``N`` parameters, ``SQNR`` in dB, ``P`` effective bits per weight):

1. ``fit_fp_law``                 NLL = E + A * N^-alpha
2. ``fit_noise_law``              dNLL = K * N^-gamma * 10^(-SQNR/10)
   ``fit_noise_law_saturating``   dNLL = x / (1 + x/S), x the noise law (saturates at S)
3. ``fit_precision_law``          dNLL = C * N^-gamma_N * exp(-P / gamma_P)
   (Kumar et al. 2024, "Scaling Laws for Precision", post-training term, tokens fixed)
4. ``fit_format_power_law``       dNLL = a * N^-b (one format, one method)

Example::

    >>> import numpy as np
    >>> n = np.array([1e6, 4e6, 1.6e7, 6.4e7, 2.56e8])
    >>> fit = fit_fp_law(n, 1.8 + 400 * n**-0.35, FitConfig(n_boot=0))
    >>> round(fit.params["E"], 2), fit.converged
    (1.8, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber
from threadpoolctl import threadpool_limits

from ptqscale_analysis.errors import AnalysisError

LN10_OVER_10 = np.log(10.0) / 10.0  # 10^(-s/10) = exp(-s * ln10/10)
BOOTSTRAPS = ("residuals", "cases")


@dataclass(frozen=True)
class FitConfig:
    """How every law is fitted. ``n_boot=0`` skips the intervals (NaN).

    ``huber_delta`` is in log units: residuals beyond it count linearly, so one bad job
    cannot drag a law (1e-3 as in Hoffmann et al. 2022).
    """

    huber_delta: float = 1e-3
    n_boot: int = 200
    bootstrap: str = "residuals"
    ci_level: float = 0.95
    seed: int = 0
    maxiter: int = 2000

    def __post_init__(self):
        if not self.huber_delta > 0:
            raise AnalysisError(f"huber_delta must be > 0, got {self.huber_delta}")
        if self.n_boot < 0:
            raise AnalysisError(f"n_boot must be >= 0, got {self.n_boot}")
        if self.bootstrap not in BOOTSTRAPS:
            raise AnalysisError(f"bootstrap must be one of {BOOTSTRAPS}, got {self.bootstrap!r}")
        if not 0 < self.ci_level < 1:
            raise AnalysisError(f"ci_level must be in (0, 1), got {self.ci_level}")


@dataclass(frozen=True)
class LawSpec:
    """A law in the optimiser's coordinates ``theta`` (logs of positive constants)."""

    name: str
    formula: str
    param_names: tuple[str, ...]
    log_model: Callable[[np.ndarray, dict], np.ndarray]
    jacobian: Callable[[np.ndarray, dict], np.ndarray]  # d log_model / d theta, (n, p)
    to_params: Callable[[np.ndarray], np.ndarray]
    bounds: tuple[tuple[float, float], ...]


@dataclass
class LawFit:
    """A fitted law: parameters, intervals, log residuals, and whether the fit converged."""

    law: str
    formula: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    residuals: np.ndarray
    converged: bool
    loss: float
    n: int
    theta: np.ndarray = field(repr=False)
    spec: LawSpec = field(repr=False)
    notes: list[str] = field(default_factory=list)

    def predict(self, **X: np.ndarray) -> np.ndarray:
        """The law's value at ``X`` (the same keyword arrays the fit took)."""
        X = {k: np.asarray(v, dtype=float) for k, v in X.items()}
        return np.exp(self.spec.log_model(self.theta, X))


# ---- the laws, in log space -------------------------------------------------------------

def log_fp(theta, X):
    log_e, log_a, alpha = theta
    return np.logaddexp(log_e, log_a - alpha * np.log(X["n"]))


def log_noise(theta, X):
    log_k, gamma = theta
    return log_k - gamma * np.log(X["n"]) - LN10_OVER_10 * X["sqnr"]


def log_noise_saturating(theta, X):
    log_x = log_noise(theta[:2], X)
    return log_x - np.logaddexp(0.0, log_x - theta[2])  # log(x / (1 + x/S))


def log_precision(theta, X):
    log_c, gamma_n, log_gamma_p = theta
    return log_c - gamma_n * np.log(X["n"]) - X["bits"] / np.exp(log_gamma_p)


def log_power(theta, X):
    log_a, b = theta
    return log_a - b * np.log(X["n"])


def jac_fp(theta, X):
    log_e, log_a, alpha = theta
    log_n = np.log(X["n"])
    m = log_fp(theta, X)
    w_a = np.exp(log_a - alpha * log_n - m)  # share of the power term in the sum
    return np.stack([np.exp(log_e - m), w_a, -log_n * w_a], axis=1)


def jac_linear(theta, X):
    """Jacobian of the noise and power laws: both are log_const - gamma * log N + const."""
    return np.stack([np.ones_like(X["n"]), -np.log(X["n"])], axis=1)


def jac_noise_saturating(theta, X):
    sigma = 1.0 / (1.0 + np.exp(theta[2] - log_noise(theta[:2], X)))  # x/S / (1 + x/S)
    return np.stack([1 - sigma, -(1 - sigma) * np.log(X["n"]), sigma], axis=1)


def jac_precision(theta, X):
    return np.stack([np.ones_like(X["n"]), -np.log(X["n"]), X["bits"] / np.exp(theta[2])],
                    axis=1)


def _exp_first(k: int) -> Callable[[np.ndarray], np.ndarray]:
    """theta -> params with the first ``k`` entries exponentiated (log-constants)."""
    return lambda t: np.concatenate([np.exp(t[:k]), t[k:]])


_GAMMA = (-3.0, 5.0)
_LOG_CONST = (-60.0, 80.0)
FP = LawSpec("fp", "NLL = E + A * N^-alpha", ("E", "A", "alpha"), log_fp, jac_fp,
             _exp_first(2), ((-10.0, 10.0), _LOG_CONST, (0.0, 3.0)))
NOISE = LawSpec("noise", "dNLL = K * N^-gamma * 10^(-SQNR/10)", ("K", "gamma"), log_noise,
                jac_linear, _exp_first(1), (_LOG_CONST, _GAMMA))
NOISE_SAT = LawSpec("noise_saturating", "dNLL = x / (1 + x/S), x = K * N^-gamma * 10^(-SQNR/10)",
                    ("K", "gamma", "S"), log_noise_saturating, jac_noise_saturating,
                    lambda t: np.array([np.exp(t[0]), t[1], np.exp(t[2])]),
                    (_LOG_CONST, _GAMMA, (-15.0, 15.0)))
PRECISION = LawSpec("precision", "dNLL = C * N^-gamma_N * exp(-P / gamma_P)",
                    ("C", "gamma_N", "gamma_P"), log_precision, jac_precision,
                    lambda t: np.array([np.exp(t[0]), t[1], np.exp(t[2])]),
                    (_LOG_CONST, _GAMMA, (np.log(0.05), np.log(100.0))))
POWER = LawSpec("format_power", "dNLL = a * N^-b", ("a", "b"), log_power, jac_linear,
                _exp_first(1),
                (_LOG_CONST, _GAMMA))


# ---- public fitters ---------------------------------------------------------------------

def fit_fp_law(n, nll, cfg: FitConfig | None = None) -> LawFit:
    """NLL(N) = E + A * N^-alpha over distinct models (needs >= 4 sizes)."""
    X, y = _inputs(FP, {"n": n}, nll, min_sizes=4)
    starts = []
    for e_frac in (0.5, 0.8, 0.95):
        for alpha in (0.1, 0.3, 0.7):
            e = e_frac * y.min()
            a = max(y[np.argmin(X["n"])] - e, 1e-3 * y.min()) * X["n"].min() ** alpha
            starts.append(np.array([np.log(e), np.log(a), alpha]))
    return _fit(FP, X, y, starts, cfg or FitConfig())


def fit_noise_law(n, sqnr_db, dnll, cfg: FitConfig | None = None) -> LawFit:
    """dNLL = K * N^-gamma * 10^(-SQNR/10): quantization error as equivalent Gaussian noise."""
    X, y = _inputs(NOISE, {"n": n, "sqnr": sqnr_db}, dnll, min_sizes=2)
    return _fit(NOISE, X, y, _linear_starts(NOISE, X, y), cfg or FitConfig())


def fit_noise_law_saturating(n, sqnr_db, dnll, cfg: FitConfig | None = None) -> LawFit:
    """The noise law bent to saturate at S for large noise: dNLL = x / (1 + x/S)."""
    X, y = _inputs(NOISE_SAT, {"n": n, "sqnr": sqnr_db}, dnll, min_sizes=2)
    starts = [np.append(t, np.log(y.max()) + extra)
              for t in _linear_starts(NOISE, X, y) for extra in (0.0, 1.0, 4.0)]
    return _fit(NOISE_SAT, X, y, starts, cfg or FitConfig())


def fit_precision_law(n, bits, dnll, cfg: FitConfig | None = None) -> LawFit:
    """dNLL = C * N^-gamma_N * exp(-P/gamma_P), P effective bits (Kumar et al. 2024)."""
    X, y = _inputs(PRECISION, {"n": n, "bits": bits}, dnll, min_sizes=2)
    if len(np.unique(X["bits"])) < 2:
        raise AnalysisError("the precision law needs >= 2 distinct effective bit widths, "
                            f"got {np.unique(X['bits']).tolist()}")
    starts = []
    for gamma_p in (0.5, 1.0, 2.0):
        for t in _linear_starts(POWER, X, y):
            log_c = np.median(np.log(y) + t[1] * np.log(X["n"]) + X["bits"] / gamma_p)
            starts.append(np.array([log_c, t[1], np.log(gamma_p)]))
    return _fit(PRECISION, X, y, starts, cfg or FitConfig())


def fit_format_power_law(n, dnll, cfg: FitConfig | None = None) -> LawFit:
    """dNLL(N) = a * N^-b for one format and method (needs >= 3 sizes)."""
    X, y = _inputs(POWER, {"n": n}, dnll, min_sizes=3)
    return _fit(POWER, X, y, _linear_starts(POWER, X, y), cfg or FitConfig())


# ---- shared machinery -------------------------------------------------------------------

def _inputs(spec: LawSpec, X: dict, y, min_sizes: int) -> tuple[dict, np.ndarray]:
    """Validated float arrays: finite, y > 0 (log space), enough distinct sizes and points."""
    y = np.asarray(y, dtype=float)
    X = {k: np.broadcast_to(np.asarray(v, dtype=float), y.shape) for k, v in X.items()}
    for name, arr in (("y", y), *X.items()):
        if not np.all(np.isfinite(arr)):
            raise AnalysisError(f"{spec.name} law: non-finite values in {name!r}")
    if np.any(y <= 0):
        raise AnalysisError(f"{spec.name} law: values must be > 0 to fit in log space "
                            f"(got min {y.min():.3g}); drop rows with dNLL <= 0 first")
    if np.any(X["n"] <= 0):
        raise AnalysisError(f"{spec.name} law: parameter counts must be > 0")
    sizes = np.unique(X["n"])
    if len(sizes) < min_sizes:
        raise AnalysisError(f"the {spec.name} law needs >= {min_sizes} distinct model sizes, "
                            f"got {len(sizes)} ({sizes.tolist()})")
    if len(y) <= len(spec.param_names):
        raise AnalysisError(f"the {spec.name} law has {len(spec.param_names)} parameters and "
                            f"needs more points than that, got {len(y)}")
    return X, y


def _linear_starts(spec: LawSpec, X: dict, y: np.ndarray) -> list[np.ndarray]:
    """Starts for laws linear in (log const, gamma): the constant matched at each gamma."""
    starts = []
    for gamma in (0.0, 0.3, 1.0):
        theta = np.array([0.0, gamma])
        log_const = np.median(np.log(y) - spec.log_model(theta, X))
        starts.append(np.array([log_const, gamma]))
    return starts


def _objective(spec: LawSpec, X: dict, log_y: np.ndarray, delta: float):
    """Mean Huber loss of the log residuals (divided by delta so gradients are O(|r|)),
    with its analytic gradient: psi(r) = clip(r, -delta, delta) is the Huber score."""
    def loss_and_grad(theta):
        r = log_y - spec.log_model(theta, X)
        psi = np.clip(r, -delta, delta)
        grad = -(psi @ spec.jacobian(theta, X)) / (len(r) * delta)
        return float(np.mean(huber(delta, r)) / delta), grad
    return loss_and_grad


def _minimise(spec, X, log_y, starts, cfg):
    """Best L-BFGS-B result over ``starts`` and whether the minimum is trustworthy.

    Converged: L-BFGS-B reported success, or (near-L1 losses often end in an "abnormal"
    line search at the minimum) a second start reached the same loss and parameters.
    """
    loss = _objective(spec, X, log_y, cfg.huber_delta)
    lo, hi = np.array(spec.bounds).T
    results = []
    for x0 in starts:
        res = minimize(loss, np.clip(x0, lo, hi), jac=True, method="L-BFGS-B",
                       bounds=spec.bounds, options={"maxiter": cfg.maxiter, "ftol": 1e-10,
                                                    "gtol": 1e-7})
        if np.isfinite(res.fun):
            results.append(res)
    if not results:
        raise AnalysisError(f"the {spec.name} law could not be evaluated at any start")
    best = min(results, key=lambda r: r.fun)
    agree = [r for r in results if abs(r.fun - best.fun) <= 1e-7 * max(1.0, abs(best.fun))
             and np.allclose(r.x, best.x, rtol=1e-3, atol=1e-3)]
    return best, bool(best.success) or len(agree) >= 2


def _fit(spec: LawSpec, X: dict, y: np.ndarray, starts, cfg: FitConfig) -> LawFit:
    log_y = np.log(y)
    # L-BFGS-B calls BLAS on 2-3 dimensional vectors; threaded OpenBLAS spins its threads on
    # every call and made each evaluation ~40x slower on a loaded machine.
    with threadpool_limits(limits=1, user_api="blas"):
        best, converged = _minimise(spec, X, log_y, starts, cfg)
        theta = best.x
        residuals = log_y - spec.log_model(theta, X)
        boot = _bootstrap(spec, X, log_y, theta, residuals, cfg)
    params = spec.to_params(theta)
    at_bound = _bound_notes(spec, theta)
    # A minimum pinned at a box bound is the box's answer, not the data's (S of the saturating
    # law at its ceiling: no saturation seen): report it as not converged, whatever L-BFGS-B says.
    converged = converged and not at_bound
    alpha = (1 - cfg.ci_level) / 2
    ci = {}
    for i, name in enumerate(spec.param_names):
        lo, hi = (np.nanquantile(boot[:, i], [alpha, 1 - alpha]) if len(boot)
                  else (np.nan, np.nan))
        ci[name] = (float(lo), float(hi))
    fit = LawFit(spec.name, spec.formula, dict(zip(spec.param_names, map(float, params))), ci,
                 residuals, converged, float(best.fun), len(y), theta, spec)
    fit.notes += at_bound
    if not converged and not at_bound:
        fit.notes.append(f"L-BFGS-B did not converge and no two starts agree: {best.message}")
    return fit


def _bootstrap(spec, X, log_y, theta, residuals, cfg) -> np.ndarray:
    """Parameter draws: refits on resampled data, started at the point estimate."""
    rng = np.random.default_rng(cfg.seed)
    n, p = len(log_y), len(theta)
    # Fitted residuals are smaller than the noise by sqrt((n-p)/n); undo it (Davison &
    # Hinkley 1997, eq. 6.9) so the intervals do not come out too narrow.
    scaled = residuals * np.sqrt(n / max(n - p, 1))
    fitted = log_y - residuals
    draws = []
    for _ in range(cfg.n_boot):
        idx = rng.integers(0, n, n)
        if cfg.bootstrap == "residuals":
            Xb, yb = X, fitted + scaled[idx]
        else:
            Xb, yb = {k: v[idx] for k, v in X.items()}, log_y[idx]
        res, _ = _minimise(spec, Xb, yb, [theta], cfg)
        draws.append(spec.to_params(res.x))
    return np.array(draws).reshape(-1, p)


def _bound_notes(spec: LawSpec, theta: np.ndarray) -> list[str]:
    notes = []
    for name, value, (lo, hi) in zip(spec.param_names, theta, spec.bounds):
        if min(value - lo, hi - value) < 1e-6 * max(1.0, hi - lo):
            notes.append(f"{name} sits at its bound ({lo:g}, {hi:g} in fit coordinates)")
    return notes
