"""The Triton kernels on the CPU under ``TRITON_INTERPRET=1`` against the torch reference.

Run by tests/formats/test_formats_kernels_interpret.py in a subprocess (the interpreter is
chosen when the kernels are decorated, at import). Prints one line per mismatch; exit status 1
if there was any.
"""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1"
sys.path.insert(0, os.path.dirname(__file__))
from test_formats_kernels import COVERED, edge_tensor  # noqa: E402

from ptqscale.formats import get_format, kernels  # noqa: E402


def same(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return torch.equal(got, ref) and torch.equal(torch.signbit(got), torch.signbit(ref))


def main() -> int:
    torch.set_num_threads(1)
    bad = []
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
        # every launch candidate (tile shape, warps) gives the same values
        x = edge_tensor((16, 512), torch.float32, seed=1)
        ref = fmt.fake_quantize(x, kernel="torch")
        for i in range(len(kernels._candidates(fmt, 16, 512, 2))):
            y = torch.empty_like(x)
            kernels._launch(x, y, fmt, choice=i)
            if not same(y, ref):
                bad.append(f"{name} candidate {i}")
    print("\n".join(bad) or f"all {len(COVERED)} formats bitwise equal")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
