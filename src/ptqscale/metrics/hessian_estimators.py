"""Cheaper estimators of the Hessian's trace and top eigenvalue (issue 23), same contracts as
``hessian.hutchinson_samples`` and ``hessian.power_iteration``.

- Stratified Hutchinson: the loss is the mean over ``B`` equal windows, so
  ``tr(H) = (1/B) sum_b tr(H_b)``; probe ``k`` is applied to window ``k mod B`` only, and
  the mean of the samples is still unbiased for ``tr(H)``. Each product costs one window
  instead of ``B``: at ``P`` probes ``B`` times cheaper, at a variance that is larger by
  ``r = mean_b ||offdiag H_b||_F^2 / ||offdiag H||_F^2`` (1 when the windows' Hessians are
  alike, about ``B`` or more when their differences dominate), so for the same variance
  ``r / B`` of the cost: it pays only where the probes' noise, not the tokens', dominates.
  bench/landscape_estimators_cpu.py measures ``r`` on real models.
- Lanczos (no reorthogonalisation, three vectors alive like the power iteration's two plus
  one): the largest-magnitude Ritz value of the tridiagonal ``T_k`` converges much faster
  than the power iteration's Rayleigh quotient when the top of the spectrum is crowded
  (Kuczynski & Wozniakowski 1992); loss of orthogonality only duplicates converged Ritz
  values, it does not move the extreme one.

Example::

    >>> A = torch.diag(torch.tensor([5.0, 4.9, 1.0, 0.5]))
    >>> w = [torch.zeros(4)]
    >>> round(lanczos(lambda v: [A @ v[0]], w, iters=4, tol=0.0, seed=0)[0], 4)
    5.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ptqscale import console

from .hessian import HVP, Vector, _normalize, blockwise_dot, gaussian, rademacher


def stratified_hutchinson_samples(
    window_hvps: Sequence[Callable[[], HVP]], weights: Sequence[torch.Tensor], probes: int,
    seed: int, progress: bool = False,
) -> torch.Tensor:
    """Per-probe, per-block samples ``v_l^T (H_b v)_l`` with probe ``k`` on window ``k mod B``.

    ``window_hvps``: one HVP factory per window (equal-length windows: equal weights), built
    once each and serving that window's ``probes / B`` probes. Probe k is the same Rademacher
    draw (``seed + k``) as in ``hessian.hutchinson_samples``. The column means estimate
    ``tr(H_l)`` of the mean loss; ``probes`` must be a multiple of ``B`` so that every window
    has the same number of probes (otherwise the plain mean would be biased).
    """
    n = len(window_hvps)
    if probes % n:
        raise ValueError(f"landscape.hutchinson_probes={probes} must be a multiple of the "
                         f"{n} windows for hutchinson_scheme=stratified")
    samples = torch.zeros(probes, len(weights), dtype=torch.float64)
    with console.bar(probes, "hessian trace (stratified)", progress, unit="hvp") as bar:
        for b, make_hvp in enumerate(window_hvps):
            hvp = make_hvp()
            for k in range(b, probes, n):
                v = rademacher(weights, seed + k)
                samples[k] = blockwise_dot(v, hvp(v))
                bar.update()
            del hvp  # frees this window's retained graph before the next one is built
    return samples


def lanczos(
    full_hvp: HVP, weights: Sequence[torch.Tensor], iters: int, tol: float, seed: int,
    progress: bool = False, history: list[float] | None = None,
) -> tuple[float, int, bool]:
    """Eigenvalue of largest magnitude of H by Lanczos: ``(eigenvalue, products, converged)``.

    Starts from the power iteration's seeded Gaussian vector; after product k the estimate
    is the extreme Ritz value of ``T_k``. Stops when it changes by less than ``tol``
    relative (``tol=0`` runs all ``iters``) or when the Krylov space is invariant (exact).
    ``history``: the estimate after each product is appended to it (convergence studies).
    """
    if iters < 1:
        raise ValueError(f"lanczos needs iters >= 1, got {iters}")
    v = _normalize(gaussian(weights, seed))
    v_prev: Vector | None = None
    alphas: list[float] = []
    betas: list[float] = []
    eig, converged = float("nan"), False
    for it in console.progress(range(1, iters + 1), "top eigenvalue (lanczos)", progress,
                               unit="hvp"):
        w = [h.to(x.dtype) for h, x in zip(full_hvp(v), v)]
        alphas.append(float(blockwise_dot(v, w).sum()))
        new = _extreme_ritz(alphas, betas)
        if history is not None:
            history.append(new)
        converged = it > 1 and abs(new - eig) <= tol * abs(new)
        eig = new
        if converged or it == iters:
            break
        for x, y in zip(w, v):  # w <- H v - alpha v - beta v_prev (three-term recurrence)
            x.sub_(y, alpha=alphas[-1])
        if v_prev is not None:
            for x, y in zip(w, v_prev):
                x.sub_(y, alpha=betas[-1])
        beta = math.sqrt(sum(float(x.double().pow(2).sum()) for x in w))
        if beta <= 1e-12 * abs(eig):  # invariant subspace: the Ritz values are eigenvalues
            converged = True
            break
        betas.append(beta)
        v_prev, v = v, [x.div_(beta) for x in w]
    return eig, it, converged


def _extreme_ritz(alphas: list[float], betas: list[float]) -> float:
    """Largest-magnitude eigenvalue of the symmetric tridiagonal (alphas, betas), in float64."""
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    theta = torch.linalg.eigvalsh(t)
    return float(theta[theta.abs().argmax()])
