"""Noise response: dNLL per SQNR level, ``kappa`` and the basin edge ``s_star_db``
(definitions in ``metrics/landscape.py``)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from ptqscale import console

from . import hessian as hs
from .landscape_config import LandscapeConfig
from .landscape_loss import (
    _check_targets,
    _key,
    _measuring,
    _shifted_nlls,
    _sq,
    _streamed,
    select_windows,
)


def noise_equivalent_dnll(kappa: float, sqnr_db: float) -> float:
    """Predicted dNLL of a perturbation with weight SQNR ``sqnr_db``: ``kappa * 10^(-s/10)``.

    >>> noise_equivalent_dnll(2.0, 20.0)
    0.02
    """
    if not (math.isfinite(kappa) and math.isfinite(sqnr_db)):
        raise ValueError(f"kappa and sqnr_db must be finite, got {kappa}, {sqnr_db}")
    return kappa * 10 ** (-sqnr_db / 10)


def measure_noise_response(
    model: nn.Module, targets: dict[str, nn.Linear], batches: torch.Tensor, cfg: LandscapeConfig,
    progress: bool = False,
) -> dict:
    """dNLL per SQNR level (mean and standard error over seeds), ``kappa`` and ``s_star_db``.

    A streamed model draws each weight's noise on the execution device once its block is
    there (the per-weight generators of ``hs.gaussian``), so it gets the directions a model
    in one piece there gets, and perturbs it there.
    """
    windows = select_windows(batches, cfg)
    _check_targets(model, targets, windows)
    levels = sorted((float(s) for s in cfg.levels_db), reverse=True)
    signs = (1.0, -1.0) if cfg.antithetic else (1.0,)
    start = time.perf_counter()
    with _measuring(model, targets, copy=not _streamed(model)) as reference:
        power = [0.0] * len(targets)  # ||W_l||^2 / numel_l: the variance at 0 dB
        dnll = torch.zeros(len(levels), cfg.seeds, dtype=torch.float64)
        clean = None
        for k in console.progress(range(cfg.seeds), "noise response", progress, unit="seed"):
            # one for every level; streamed: drawn per block on the device, in every pass
            noise = hs.gaussian(reference, cfg.seed + k) if reference is not None else None
            shifts = [partial(_noisy, noise, cfg.seed + k, power, s, sign)
                      for s in levels for sign in signs]
            if clean is None:  # first: ||W||^2 per target, read before any level needs it
                shifts.insert(0, partial(_power_of, power))
            scores = _shifted_nlls(model, windows, cfg.batch_size, targets, reference, shifts)
            if clean is None:
                clean = scores.pop(0)
            for i in range(len(levels)):  # one walk per seed when streamed
                pair = scores[i * len(signs):(i + 1) * len(signs)]
                dnll[i, k] = sum(pair) / len(pair) - clean
    out = {"nll_clean": clean, "landscape_tokens": windows.numel()}
    out.update(summarize_noise_response(levels, dnll, cfg))
    out["cost_noise_response_s"] = time.perf_counter() - start
    out["cost_noise_response_tokens"] = windows.numel() * (1 + len(levels) * cfg.seeds * len(signs))
    return out


def _power_of(power: list[float], j: int, w: torch.Tensor) -> torch.Tensor:
    power[j] = _sq(w) / w.numel()  # where the weight is: on the device when streamed
    return w


def _noisy(noise: list[torch.Tensor] | None, seed: int, power: list[float], level: float,
           sign: float, j: int, w: torch.Tensor) -> torch.Tensor:
    """``W_j + sign sigma_j z_j`` at SQNR ``level``, one expression for both placements (the
    same bits); ``z_j`` from ``noise``, or drawn where ``w`` is (streamed: on the device)."""
    z = noise[j] if noise is not None else hs.gaussian_block(w, seed, j)
    sigma = math.sqrt(power[j] / 10 ** (level / 10))
    return torch.add(w, z, alpha=sign * sigma)


def summarize_noise_response(
    levels: Sequence[float], dnll: torch.Tensor, cfg: LandscapeConfig
) -> dict:
    """Flat features from ``dnll[level, seed]`` (levels sorted from high to low SQNR)."""
    mean = dnll.mean(dim=1)
    sem = dnll.std(dim=1) / math.sqrt(dnll.shape[1]) if dnll.shape[1] > 1 else 0 * mean
    out: dict = {}
    for s, m, e in zip(levels, mean.tolist(), sem.tolist()):
        out[f"dnll_at_{_key(s)}db"] = m
        out[f"dnll_sem_at_{_key(s)}db"] = e
    out.update(fit_kappa(levels, mean.tolist(), cfg.kappa_max_dnll))
    out.update(basin_edge(levels, mean.tolist(), cfg.threshold))
    return out


def fit_kappa(levels: Sequence[float], dnll: Sequence[float], max_dnll: float) -> dict:
    """``kappa = sum dNLL_i / sum 10^(-s_i/10)`` over levels with ``dNLL_i <= max_dnll``.

    The ratio of sums is least squares through the origin weighted by 1/x, which suits a
    noise whose variance grows with the noise power x = 10^(-s/10). When no level is in the
    small-noise regime, the highest-SQNR level alone is used and ``kappa_linear`` is False.

    >>> round(fit_kappa([40.0, 30.0, 20.0], [0.0002, 0.002, 0.5], max_dnll=0.01)["kappa"], 6)
    2.0
    """
    pairs = [(s, d) for s, d in zip(levels, dnll) if d <= max_dnll]
    linear = bool(pairs)
    if not linear:
        pairs = [max(zip(levels, dnll))]
    kappa = sum(d for _, d in pairs) / sum(10 ** (-s / 10) for s, _ in pairs)
    return {
        "kappa": kappa,
        "kappa_linear": linear,
        "kappa_n_levels": len(pairs),
        "kappa_min_db": min(s for s, _ in pairs),
    }


def basin_edge(levels: Sequence[float], dnll: Sequence[float], threshold: float) -> dict:
    """``s_star_db``: where dNLL first reaches ``threshold`` going down in SQNR.

    Interpolated in ``(s, log dNLL)`` (linear in the small-noise regime) between the
    bracketing levels, linearly when the upper one is not positive. None when the highest
    level is already past the threshold or no level reaches it (``s_star_bracketed`` False).

    >>> basin_edge([30.0, 20.0], [0.01, 1.0], threshold=0.1)["s_star_db"]
    25.0
    """
    pairs = sorted(zip(levels, dnll), reverse=True)
    for i, (s, d) in enumerate(pairs):
        if d < threshold:
            continue
        if i == 0:
            break
        s0, d0 = pairs[i - 1]
        if d0 > 0:
            frac = math.log(threshold / d0) / math.log(d / d0)
        else:
            frac = (threshold - d0) / (d - d0)
        return {"s_star_db": s0 + frac * (s - s0), "s_star_bracketed": True}
    return {"s_star_db": None, "s_star_bracketed": False}
