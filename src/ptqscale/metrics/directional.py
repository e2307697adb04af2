"""Directional profile: dNLL along the segment from the weights to a job's quantized weights."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from .landscape_config import _check_ts
from .landscape_loss import _check_targets, _key, _measuring, _shifted_nlls, _sq, _streamed


def measure_directional_profile(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    batches: torch.Tensor,
    quantize_fn: Callable[[torch.Tensor], torch.Tensor],
    ts: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    *,
    batch_size: int = 1,
) -> dict:
    """dNLL at ``W + t (Q(W) - W)`` for each ``t``, with ``Q = quantize_fn`` per target weight.

    Also the weight SQNR of ``Q`` and the least-squares fit ``dNLL(t) ~= a t + b t^2``
    (``directional_linear`` a = g . D, ``directional_quadratic`` b = D^T H D / 2).
    """
    _check_ts(ts)
    _check_targets(model, targets, batches)
    start = time.perf_counter()
    names = list(targets)
    sums: list[tuple[float, float]] = [(0.0, 0.0)] * len(names)  # per target: ||W||^2, ||D||^2
    with _measuring(model, targets, copy=not _streamed(model)) as reference:
        deltas = None  # streamed: D = Q(W) - W made per block on the device, for every pass
        if reference is not None:
            with torch.no_grad():
                deltas = [_delta(name, quantize_fn, r) for name, r in zip(names, reference)]
        shifts = [partial(_toward_q, deltas, quantize_fn, names, float(t), sums if n == 0 else None)
                  for n, t in enumerate(ts)]
        clean, *shifted = _shifted_nlls(model, batches, batch_size, targets, reference,
                                        [_unshifted, *shifts])  # streamed: one walk
        dnll = [nll - clean for nll in shifted]
    signal, err = sum(s for s, _ in sums), sum(e for _, e in sums)
    out = {f"directional_dnll_at_t{_key(float(t))}": d for t, d in zip(ts, dnll)}
    # None when Q(W) == W (no error: infinite SQNR, which JSON cannot hold)
    out["directional_sqnr_db"] = 10 * math.log10(signal / err) if err > 0 else None
    design = torch.tensor([[float(t), float(t) ** 2] for t in ts], dtype=torch.float64)
    coef = torch.linalg.lstsq(design, torch.tensor(dnll, dtype=torch.float64)[:, None]).solution
    out["directional_linear"], out["directional_quadratic"] = coef[:, 0].tolist()
    out["cost_directional_s"] = time.perf_counter() - start
    out["cost_directional_tokens"] = batches.numel() * (1 + len(ts))
    return out


def _unshifted(j: int, w: torch.Tensor) -> torch.Tensor:
    return w


def _toward_q(deltas, quantize_fn, names, t: float, sums: list | None, j: int,
              w: torch.Tensor) -> torch.Tensor:
    """``W_j + t D_j``, one expression for both placements; records ``||W_j||^2, ||D_j||^2``."""
    d = deltas[j] if deltas is not None else _delta(names[j], quantize_fn, w)
    if sums is not None:
        sums[j] = (_sq(w), _sq(d))
    return torch.add(w, d, alpha=t)


def _delta(name: str, quantize_fn, w: torch.Tensor) -> torch.Tensor:
    q = quantize_fn(w.clone())  # a clone: quantize_fn must not be able to touch the weights
    if not isinstance(q, torch.Tensor) or q.shape != w.shape:
        raise ValueError(f"quantize_fn({name}) must return a tensor of shape {tuple(w.shape)}")
    if not torch.isfinite(q).all():
        raise ValueError(f"quantize_fn({name}) returned non-finite values")
    return q.to(w.dtype) - w
