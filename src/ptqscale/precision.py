"""Full float32 where a result depends on it, whatever the caller set (TF32 off)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def true_float32() -> Iterator[None]:
    """float32 matmuls in full float32 for the duration, the caller's setting back after.

    TF32 (``set_float32_matmul_precision("high")``, which training scripts often set) keeps 10
    mantissa bits of each product. That is harmless for a forward pass's NLL at the 1e-3 level
    but not for a finite difference of two gradients: on an H100 it put the forward-difference
    Hessian trace 55-77% off (bench/results/fd_tf32_h100.md). Golden scores of the zoo need true
    float32 on any GPU too.
    """
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)
