"""Second-order landscape features: Hutchinson trace (total, per layer), ``kappa_h`` and the
top eigenvalue of the Hessian of the mean NLL over the budget's windows."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import torch
from torch import nn

from ptqscale.errors import ConfigError

from . import hessian as hs
from . import hessian_estimators as est
from .hessian_streamed import check_streamable, streamed_hessian
from .landscape_config import LandscapeConfig
from .landscape_loss import _check_targets, _measuring, _sq, nll_loss, select_windows


def measure_hessian(
    model: nn.Module, targets: dict[str, nn.Linear], batches: torch.Tensor, cfg: LandscapeConfig,
    progress: bool = False,
) -> dict:
    """Hutchinson trace (total, per layer), ``kappa_h`` and the top eigenvalue.

    Every HVP is a sum over micro-batches of ``cfg.hvp_windows`` windows, each weighted by
    its share of the budget's windows (equal-length windows: the Hessian of the mean NLL over
    all tokens, exactly); only one micro-batch's graph is alive at a time. With
    ``hutchinson_scheme=stratified`` probe k sees window ``k mod n`` only (one window per
    product, unbiased); ``eig_method`` picks power iteration or Lanczos; ``hvp_dtype`` runs
    the products with the model's parameters in fp32 or bf16 (see ``hessian_estimators``).
    Per-layer entries are under ``"layers"`` (name -> trace and ``||W||^2/numel``); every
    other key is a scalar. Standard errors come from the spread over probes (stratified: an
    upper bound, the spread between windows included).
    """
    from ptqscale.models.streaming import placement_of

    windows = select_windows(batches, cfg)
    _check_targets(model, targets, windows)
    streamed = placement_of(model).streamed
    if streamed:
        check_streamable(model, targets, cfg.hvp)
        _check_streamed_estimators(cfg)
    if cfg.hutchinson_scheme == "stratified" and cfg.hutchinson_probes % windows.shape[0]:
        raise ValueError(f"landscape.hutchinson_probes={cfg.hutchinson_probes} must be a "
                         f"multiple of the budget's {windows.shape[0]} windows for "
                         f"hutchinson_scheme=stratified")
    weights = [m.weight for m in targets.values()]
    autograd = cfg.hvp == "autograd"  # double backward needs eager attention; FD does not
    with _measuring(model, targets) as reference, \
            hs.double_backward_ready(model, weights, eager=autograd or streamed), \
            _parameters_in(model, cfg.hvp_dtype):
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if streamed:
            samples, trace_s, eig, iters, converged, eig_s = streamed_hessian(
                model, targets, windows, cfg, progress)
        else:
            start = time.perf_counter()
            if cfg.hutchinson_scheme == "stratified":
                per_window = replace(cfg, hvp_windows=1)  # one product = one window
                samples = est.stratified_hutchinson_samples(
                    [make for _, make in _batch_hvps(model, windows, weights, reference,
                                                     per_window, cfg.hvp_retain_graph,
                                                     trace=True)],
                    weights, cfg.hutchinson_probes, cfg.seed, progress)
            else:
                samples = hs.hutchinson_samples(
                    _batch_hvps(model, windows, weights, reference, cfg, cfg.hvp_retain_graph,
                                trace=True),
                    weights, cfg.hutchinson_probes, cfg.seed, progress)
            trace_s = time.perf_counter() - start

            start = time.perf_counter()
            eig, iters, converged = None, 0, False
            if cfg.power_iters > 0:  # one product per graph: never worth retaining it
                full_hvp = hs.summed_hvp(
                    _batch_hvps(model, windows, weights, reference, cfg, False), weights)
                top = est.lanczos if cfg.eig_method == "lanczos" else hs.power_iteration
                eig, iters, converged = top(
                    full_hvp, weights, cfg.power_iters, cfg.power_tol, cfg.seed, progress)
            eig_s = time.perf_counter() - start
    scale = torch.tensor([_sq(r) / r.numel() for r in reference], dtype=torch.float64)
    out = {"hvp_method": cfg.hvp, "hutchinson_probes": cfg.hutchinson_probes,
           "hvp_windows": cfg.hvp_windows, "hvp_retain_graph": cfg.hvp_retain_graph,
           "hutchinson_scheme": cfg.hutchinson_scheme, "eig_method": cfg.eig_method,
           "hvp_dtype": cfg.hvp_dtype, "fd_trace": cfg.fd_trace, "hvp_attention": attention}
    out.update(hs.trace_stats(samples, scale))
    out.update(top_eigenvalue=eig, power_iters_run=iters, power_converged=converged)
    n_tok = windows.numel()
    out.update(
        cost_hessian_trace_s=trace_s,
        cost_hessian_trace_tokens=trace_tokens(cfg, windows.shape[0], n_tok, streamed),
        cost_hessian_trace_hvps=cfg.hutchinson_probes,
        cost_top_eigenvalue_s=eig_s,
        cost_top_eigenvalue_tokens=eigen_tokens(cfg, n_tok, iters, streamed),
        cost_top_eigenvalue_hvps=iters,
    )
    out["layers"] = {
        name: {"hessian_trace": float(t), "weight_sq_per_numel": float(c)}
        for name, t, c in zip(targets, samples.mean(dim=0), scale)
    }
    return out


def _check_streamed_estimators(cfg: LandscapeConfig) -> None:
    """A streamed model runs the v1 estimators only (its HVP is a hand-written block sweep)."""
    for key, v1 in LandscapeConfig.added_later.items():
        if getattr(cfg, key) != v1:
            raise ConfigError(f"landscape.{key}={getattr(cfg, key)!r} is not available for a "
                              f"streamed model (model.placement=streamed); use {v1!r}")


@contextmanager
def _parameters_in(model: nn.Module, dtype: str) -> Iterator[None]:
    """The model's floating parameters in ``dtype`` ("float32": as they are, fp32 already);
    buffers (rotary frequencies) stay fp32. The fp32 tensors are kept and put back, exactly."""
    if dtype == "float32":
        yield
        return
    params = [p for p in model.parameters() if p.dtype == torch.float32]
    kept = [p.data for p in params]
    for p in params:
        p.data = p.data.to(getattr(torch, dtype))
    try:
        yield
    finally:
        for p, d in zip(params, kept):
            p.data = d


def _fp32_products(make_hvp: Callable[[], hs.HVP]) -> Callable[[], hs.HVP]:
    """An HVP factory for a low-precision model taking and giving fp32 vectors: the probe is
    cast to the weights' dtype for the double backward, and every sum over products (micro-
    batches, Lanczos) runs in fp32."""

    def make() -> hs.HVP:
        hvp = make_hvp()
        return lambda v: [h.float() for h in hvp([x.to(torch.bfloat16) for x in v])]

    return make


def trace_tokens(cfg: LandscapeConfig, n_windows: int, n_tok: int, streamed: bool = False
                 ) -> int:
    """Tokens through forward passes for the trace. Per probe: FD 2 gradients (forward
    differences 1), autograd 1 double backward when the graph is rebuilt (0 when retained),
    streamed 2 (a forward sweep and a recomputing backward sweep); once per micro-batch: the
    retained graph, or forward differences' shared g(W). A stratified probe covers one
    window of the ``n_windows``, not all."""
    fd, forward = cfg.hvp == "finite_difference", cfg.fd_trace == "forward"
    if fd:
        per_probe, shared = (1, 1) if forward else (2, 0)
    elif streamed:
        per_probe, shared = 2, 0
    else:
        per_probe, shared = (0, 1) if cfg.hvp_retain_graph else (1, 0)
    probe_tokens = n_tok // n_windows if cfg.hutchinson_scheme == "stratified" else n_tok
    return cfg.hutchinson_probes * per_probe * probe_tokens + shared * n_tok


def eigen_tokens(cfg: LandscapeConfig, n_tok: int, iters: int, streamed: bool = False) -> int:
    """Tokens through forward passes for ``iters`` products of the top eigenvalue: 2 per token
    with finite differences (central) or streamed, else 1 (the graph is never retained)."""
    return n_tok * (2 if cfg.hvp == "finite_difference" or streamed else 1) * iters


def _batch_hvps(model, windows, weights, reference, cfg, retain_graph: bool, trace: bool = False
                ) -> list[tuple[float, Callable]]:
    """``(fraction of windows, make_hvp)`` per micro-batch of ``cfg.hvp_windows`` windows;
    ``trace``: the products are Hutchinson's (``cfg.fd_trace`` applies)."""
    out = []
    for ids in windows.split(cfg.hvp_windows):
        loss_fn = partial(nll_loss, model, ids)
        if cfg.hvp == "autograd":
            make = partial(hs.autograd_hvp, loss_fn, weights, retain_graph=retain_graph)
        else:
            eps = cfg.fd_eps if trace or cfg.fd_eps_eig is None else cfg.fd_eps_eig
            make = partial(hs.finite_difference_hvp, loss_fn, weights, reference, eps,
                           one_sided=trace and cfg.fd_trace == "forward")
        if cfg.hvp_dtype == "bfloat16":
            make = _fp32_products(make)
        # windows have equal length, so the share of windows is the share of tokens
        out.append((ids.shape[0] / windows.shape[0], make))
    return out
