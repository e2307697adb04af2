"""Loss-landscape features around the trained weights (DESIGN "Measured quantities", protocol v1).

The loss everywhere is the mean next-token NLL (nats) of the model over fixed token windows
``batches[n, seqlen]``, with fp32 logits and float64 accumulation. Every feature is measured
with the model temporarily in fp32 (bf16 -> fp32 -> bf16 is exact), so the noise response and
the Hessian see the same function; the quantizable weights are restored bit-exactly after
every perturbation, and that is asserted. A streamed model (``model.placement=streamed``) is
perturbed block by block on the execution device as each block is onloaded (the noise drawn
there, the same numbers and the same expression ``W + a z`` as in one piece); its weights on the
CPU are never written, so no host copy of them is kept.

- Noise response: Gaussian noise of per-layer variance ``||W_l||^2 / (numel_l 10^(s/10))``
  at each SQNR level ``s``; ``dNLL(s) = NLL(noisy) - NLL(clean)``, mean over seeds. Seed k
  draws one noise direction used at every level (common random numbers: the curve is
  smooth in ``s``), and with ``antithetic`` both ``+noise`` and ``-noise`` are scored, which
  cancels the first-order term ``g . noise`` exactly instead of only on average.
- ``kappa``: ``dNLL ~= kappa * 10^(-s/10)`` fitted as ``sum dNLL / sum 10^(-s/10)`` over the
  levels whose mean dNLL is at most ``kappa_max_dnll`` (the small-noise regime).
- ``s_star_db``: the SQNR at which dNLL first reaches ``threshold`` going from high to low
  SQNR, interpolated between the two bracketing levels in ``(s, log dNLL)``.
- Second order (``measure_hessian``): Hutchinson trace, per-layer traces, top eigenvalue,
  and ``kappa_h = 0.5 sum_l (||W_l||^2/numel_l) tr(H_l)``, the same small-noise coefficient
  as ``kappa`` (``E[eps^T H eps] = sum_l sigma_l^2 tr(H_l)``): their ratio is a built-in check.
- Directional profile: dNLL at ``W + t (Q(W) - W)`` for a job's quantizer ``Q``.

Example::

    >>> cfg = LandscapeConfig(enabled=True, max_tokens=4096)
    >>> feats = measure_landscape(model, anat.targets, windows, cfg)   # doctest: +SKIP
    >>> feats["kappa"], feats["kappa_h"], feats["s_star_db"]           # doctest: +SKIP
    >>> noise_equivalent_dnll(feats["kappa"], sqnr_db=24.1)            # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

# The pieces live in their own modules; this one keeps the public names (and the private
# helpers that tests and benches import) where they always were.
from .directional import measure_directional_profile
from .hessian_streamed import check_streamable
from .landscape_config import (
    EIG_METHODS,
    FD_TRACES,
    HUTCHINSON_SCHEMES,
    HVP_DTYPES,
    HVP_METHODS,
    LANDSCAPE_PROTOCOL,
    LandscapeConfig,
    _check_ts,
)
from .landscape_loss import (
    _check_targets,
    _measuring,
    _shifted_nlls,
    _streamed,
    mean_nll,
    nll_from_logits,
    nll_loss,
    select_windows,
)
from .noise_response import (
    basin_edge,
    fit_kappa,
    measure_noise_response,
    noise_equivalent_dnll,
    summarize_noise_response,
)
from .second_order import (
    _batch_hvps,
    _check_streamed_estimators,
    measure_hessian,
    trace_tokens,
)

__all__ = [
    "EIG_METHODS", "FD_TRACES", "HUTCHINSON_SCHEMES", "HVP_DTYPES", "HVP_METHODS", "LANDSCAPE_PROTOCOL", "LandscapeConfig", "_batch_hvps", "_check_targets",
    "_check_ts", "_measuring", "trace_tokens", "_shifted_nlls", "_streamed", "basin_edge",
    "fit_kappa", "mean_nll", "measure_directional_profile", "measure_hessian",
    "measure_landscape", "measure_noise_response", "nll_from_logits", "nll_loss",
    "noise_equivalent_dnll", "select_windows", "summarize_noise_response",
]


def measure_landscape(
    model: nn.Module, targets: dict[str, nn.Linear], batches: torch.Tensor, cfg: LandscapeConfig,
    progress: bool = False,
) -> dict:
    """Every model-level feature at ``cfg``'s budget: noise response, and (``cfg.hessian``)
    the second-order features with ``kappa_ratio = kappa_h / kappa``.

    All keys are JSON scalars except ``"layers"`` (per-layer Hessian traces).
    """
    from ptqscale.models.streaming import placement_of

    if cfg.hessian and placement_of(model).streamed:  # before the noise response's work
        check_streamable(model, targets, cfg.hvp)
        _check_streamed_estimators(cfg)
    out: dict = {"landscape_protocol": LANDSCAPE_PROTOCOL}
    out.update(measure_noise_response(model, targets, batches, cfg, progress))
    if cfg.hessian:
        out.update(measure_hessian(model, targets, batches, cfg, progress))
        out["kappa_ratio"] = out["kappa_h"] / out["kappa"] if out["kappa"] != 0 else None
    return out
