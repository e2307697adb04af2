"""The Triton kernels on the CPU under ``TRITON_INTERPRET=1`` against the torch reference.

Run by tests/formats/test_formats_kernels_interpret.py in a subprocess (the interpreter is
chosen when the kernels are decorated, at import). ``finite`` checks edge-case tensors in every
dtype, layout and launch candidate; ``non-finite`` checks NaN / +inf / -inf at various places
in every layout (tiled, looped in one and in several chunks, the two-pass per-tensor rules)
against the reference's policy (docs/formats.md, "Non-finite values"), bit for bit in float32
(NaN payloads included). No argument runs both. Prints one line per mismatch; exit status 1
if there was any.
"""

from __future__ import annotations

import math
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1"
sys.path.insert(0, os.path.dirname(__file__))
from test_formats_kernels import COVERED, edge_tensor  # noqa: E402

from ptqscale.formats import get_format, kernels  # noqa: E402


def same(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.equal(got, ref) and torch.equal(torch.signbit(got), torch.signbit(ref))


def bits_equal(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same bits (float32): NaN payloads and signs included."""
    return torch.equal(got.view(torch.int32), ref.view(torch.int32))


def poison(x: torch.Tensor, value: float) -> torch.Tensor:
    """``x`` (rows >= 5, float32) with ``value`` at the first and last element and inside the
    first row, filling row 2, beside a large outlier (the element that sets its group's or the
    tensor's scale) and in the last columns (a short last group where the length is not a
    multiple of the group's) of row 4, and a NaN and a -inf together in row 3."""
    x = x.clone()
    n = x.shape[-1]
    x[0, 0] = x[-1, -1] = x[0, n // 3] = value
    x[2] = value
    x[3, 5], x[3, n - 7] = math.nan, -math.inf
    x[4, n // 2], x[4, n // 2 + 1] = 5e3, value
    x[4, n - 3] = value
    return x


def check_non_finite(bad: list) -> None:
    # (5, 200): tiled groups with a masked tail, looped for odd groups; (8, 256) on both axes;
    # (5, 9000): per-channel rows over 8192, looped in 3 chunks; (5, 8192): two-pass rules with
    # two pass-1 iterations per program (5 loads of 8192 elements over 4 programs)
    # (the two wide ones only where they reach another layout: per-channel or per-tensor rules)
    cases = [((5, 200), (-1,)), ((8, 256), (-1, 0))]
    wide = [((5, 9000), (-1,)), ((5, 8192), (-1,))]
    for name in COVERED:
        fmt = get_format(name)
        whole = (fmt.scale_group_size(9000) or 9000) >= 9000 or kernels.kernel_spec(fmt)["TENSOR"]
        for shape, axes in cases + (wide if whole else []):
            base = edge_tensor(shape, torch.float32, seed=7)
            for value in (math.nan, math.inf, -math.inf):
                x = poison(base, value)
                for axis in axes:
                    got = fmt.fake_quantize(x, axis, kernel="triton")
                    ref = fmt.fake_quantize(x, axis, kernel="torch")
                    if not (bits_equal(got, ref)
                            and torch.equal(torch.isfinite(got), torch.isfinite(x))):
                        bad.append(f"{name} non-finite {value} {shape} axis={axis}")
        # nothing finite at all, and a bf16 tensor (NaN compared as NaN: see the docstring)
        x = torch.tensor([[math.nan, math.inf, -math.inf, math.nan] * 16] * 2)
        if not bits_equal(fmt.fake_quantize(x, kernel="triton"), x):
            bad.append(f"{name} non-finite: an all-non-finite tensor changed")
        xb = poison(edge_tensor((5, 200), torch.float32, seed=8), math.inf)
        xb[0, 1] = math.nan
        xb = xb.to(torch.bfloat16)
        got, ref = fmt.fake_quantize(xb, kernel="triton"), fmt.fake_quantize(xb, kernel="torch")
        keep = ~torch.isnan(ref)
        if not (torch.equal(torch.isnan(got), torch.isnan(ref)) and same(got[keep], ref[keep])):
            bad.append(f"{name} non-finite bf16")


def check_finite(bad: list) -> None:
    for name in COVERED:
        fmt = get_format(name)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            shapes = [((8, 256), (-1, 0)), ((5, 200), (-1,)), ((2, 3, 40), (1,))]
            if dtype == torch.float32:  # per-channel rows over 8192: the looped kernel, 3 chunks
                shapes.append(((2, 9000), (-1,)))
            for shape, axes in shapes:
                x = edge_tensor(shape, dtype).clamp(-6e4, 6e4)  # (finite in fp16)
                for axis in axes:
                    got = fmt.fake_quantize(x, axis, kernel="triton")
                    if got.dtype != dtype or not same(got, fmt.fake_quantize(x, axis, kernel="torch")):
                        bad.append(f"{name} {dtype} {shape} axis={axis}")
        # every launch candidate (tile shape, warps) gives the same values; for per-channel
        # rules also on long rows: held whole in one tile or looped in chunks (9000), and
        # looped only (20000)
        shapes = [(16, 512)]
        if (fmt.scale_group_size(9000) or 9000) >= 9000 and not kernels.kernel_spec(fmt)["TENSOR"]:
            shapes += [(5, 9000), (5, 20000)]
        for shape in shapes:
            x = edge_tensor(shape, torch.float32, seed=1)
            ref = fmt.fake_quantize(x, kernel="torch")
            for i in range(len(kernels._candidates(fmt, *shape, 2))):
                y = torch.empty_like(x)
                kernels._launch(x, y, fmt, choice=i)
                if not same(y, ref):
                    bad.append(f"{name} {shape} candidate {i}")


def main(modes: list[str]) -> int:
    torch.set_num_threads(1)
    bad: list[str] = []
    for mode in modes or ["finite", "non-finite"]:
        {"finite": check_finite, "non-finite": check_non_finite}[mode](bad)
    print("\n".join(bad) or f"all {len(COVERED)} formats bitwise equal ({modes or 'all'})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
