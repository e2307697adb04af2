"""Signal-to-quantization-noise ratio.

Example:
    >>> round(sqnr_db(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.1])), 2)
    26.99
"""

from __future__ import annotations

import math

import torch


def sqnr_db(x: torch.Tensor, q: torch.Tensor) -> float:
    """10*log10(sum x^2 / sum (x - q)^2) in dB, accumulated in float64; +inf when q == x.

    A zero signal with a non-zero error gives -inf; a NaN or inf in ``x`` or ``q`` gives NaN
    (no meaningful ratio; formats keep such values in place, docs/formats.md).
    """
    if x.shape != q.shape:
        raise ValueError(f"sqnr_db: shapes differ, x {tuple(x.shape)} vs q {tuple(q.shape)}")
    x64, q64 = x.detach().to(torch.float64), q.detach().to(torch.float64)
    signal = float(x64.square().sum())
    noise = float((x64 - q64).square().sum())
    if not (math.isfinite(signal) and math.isfinite(noise)):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
