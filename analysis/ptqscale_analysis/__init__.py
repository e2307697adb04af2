"""ptqscale_analysis: records -> fitted laws, a predictor, answers, pictures, a report.

Reads result records through :mod:`ptqscale.store` only and never imports torch, so it
runs on a laptop. Modules, in dependency order:

- ``errors``     :class:`AnalysisError` (a ``ValueError`` with a message for people)
- ``load``       records -> tidy frame with derived columns (``load_study``, ``load_wandb``)
- ``laws``       scaling laws fitted with Huber loss, multi-start L-BFGS-B, bootstrap CIs
- ``predictor``  random forest on model and format features, grouped cross-validation
- ``queries``    ``predict_nll``, ``pareto_frontier``, ``best_under_budget``
- ``plots``      one function per figure, each returns a matplotlib Figure
- ``report``     ``write_report(root, study, out_dir)`` -> report.md + report.html
- ``cli``        the ``ptqscale-fit/-predict/-pareto/-report`` console scripts

To add a law: write ``log_<law>(theta, X)`` and a :class:`~ptqscale_analysis.laws.LawSpec`
in ``laws.py``, a ``fit_<law>`` wrapper, its name in ``study_fits.ALL_LAWS`` and a call in
``study_fits._fit_dnll_laws``.

Example::

    >>> from ptqscale_analysis import load_study, fit_fp_law   # doctest: +SKIP
    >>> frame = load_study("results", "quickstart")           # doctest: +SKIP
"""

from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.laws import (
    FitConfig,
    LawFit,
    fit_format_power_law,
    fit_fp_law,
    fit_noise_law,
    fit_noise_law_saturating,
    fit_precision_law,
)
from ptqscale_analysis.load import load_study, load_wandb

__all__ = [
    "AnalysisError",
    "FitConfig",
    "LawFit",
    "fit_format_power_law",
    "fit_fp_law",
    "fit_noise_law",
    "fit_noise_law_saturating",
    "fit_precision_law",
    "load_study",
    "load_wandb",
]
