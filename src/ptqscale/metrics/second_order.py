"""Second-order landscape features: Hutchinson trace (total, per layer), ``kappa_h`` and the
top eigenvalue of the Hessian of the mean NLL over the budget's windows."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from . import hessian as hs
from .hessian_streamed import check_streamable, streamed_hessian
from .landscape_config import LandscapeConfig
from .landscape_loss import _check_targets, _measuring, _sq, nll_loss, select_windows


def measure_hessian(
    model: nn.Module, targets: dict[str, nn.Linear], batches: torch.Tensor, cfg: LandscapeConfig,
    progress: bool = False,
) -> dict:
    """Hutchinson trace (total, per layer), ``kappa_h`` and the top eigenvalue, in fp32.

    Every HVP is a sum over micro-batches of ``cfg.hvp_windows`` windows, each weighted by
    its share of the budget's windows (equal-length windows: the Hessian of the mean NLL over
    all tokens, exactly); only one micro-batch's graph is alive at a time.
    Per-layer entries are under ``"layers"`` (name -> trace and ``||W||^2/numel``); every
    other key is a scalar. Standard errors come from the spread over probes.
    """
    from ptqscale.models.streaming import placement_of

    windows = select_windows(batches, cfg)
    _check_targets(model, targets, windows)
    if placement_of(model).streamed:
        check_streamable(model, targets, cfg.hvp)
    weights = [m.weight for m in targets.values()]
    with _measuring(model, targets) as reference, hs.double_backward_ready(model, weights):
        if placement_of(model).streamed:
            samples, trace_s, eig, iters, converged, eig_s = streamed_hessian(
                model, targets, windows, cfg, progress)
        else:
            start = time.perf_counter()
            samples = hs.hutchinson_samples(
                _batch_hvps(model, windows, weights, reference, cfg, cfg.hvp_retain_graph),
                weights, cfg.hutchinson_probes, cfg.seed, progress)
            trace_s = time.perf_counter() - start

            start = time.perf_counter()
            eig, iters, converged = None, 0, False
            if cfg.power_iters > 0:  # one product per graph: never worth retaining it
                full_hvp = hs.summed_hvp(
                    _batch_hvps(model, windows, weights, reference, cfg, False), weights)
                eig, iters, converged = hs.power_iteration(
                    full_hvp, weights, cfg.power_iters, cfg.power_tol, cfg.seed, progress
                )
            eig_s = time.perf_counter() - start
    scale = torch.tensor([_sq(r) / r.numel() for r in reference], dtype=torch.float64)
    out = {"hvp_method": cfg.hvp, "hutchinson_probes": cfg.hutchinson_probes,
           "hvp_windows": cfg.hvp_windows, "hvp_retain_graph": cfg.hvp_retain_graph}
    out.update(hs.trace_stats(samples, scale))
    out.update(top_eigenvalue=eig, power_iters_run=iters, power_converged=converged)
    n_tok, streamed = windows.numel(), placement_of(model).streamed
    out.update(
        cost_hessian_trace_s=trace_s,
        cost_hessian_trace_tokens=n_tok * _passes_per_trace(cfg, streamed),
        cost_hessian_trace_hvps=cfg.hutchinson_probes,
        cost_top_eigenvalue_s=eig_s,
        cost_top_eigenvalue_tokens=n_tok * (2 if cfg.hvp == "finite_difference" or streamed
                                            else 1) * iters,
        cost_top_eigenvalue_hvps=iters,
    )
    out["layers"] = {
        name: {"hessian_trace": float(t), "weight_sq_per_numel": float(c)}
        for name, t, c in zip(targets, samples.mean(dim=0), scale)
    }
    return out


def _passes_per_trace(cfg: LandscapeConfig, streamed: bool = False) -> int:
    """Forward passes over the budget for the trace: FD takes 2 gradients per probe; autograd
    builds each micro-batch's graph once for all probes, or once per probe when not retained;
    streamed, every probe is a forward sweep plus a recomputing backward sweep (2 passes)."""
    if cfg.hvp == "finite_difference" or streamed:
        return 2 * cfg.hutchinson_probes
    return 1 if cfg.hvp_retain_graph else cfg.hutchinson_probes


def _batch_hvps(model, windows, weights, reference, cfg, retain_graph: bool
                ) -> list[tuple[float, Callable]]:
    """``(fraction of windows, make_hvp)`` per micro-batch of ``cfg.hvp_windows`` windows."""
    out = []
    for ids in windows.split(cfg.hvp_windows):
        loss_fn = partial(nll_loss, model, ids)
        if cfg.hvp == "autograd":
            make = partial(hs.autograd_hvp, loss_fn, weights, retain_graph=retain_graph)
        else:
            make = partial(hs.finite_difference_hvp, loss_fn, weights, reference, cfg.fd_eps)
        # windows have equal length, so the share of windows is the share of tokens
        out.append((ids.shape[0] / windows.shape[0], make))
    return out
