"""Compile every fused kernel for an H100/H200 (sm_90) without a GPU: Triton's frontend in
compiled mode (which the interpreter does not exercise), ptxas, and no register spills.

Run by tests/formats/test_formats_kernels_interpret.py (where triton is installed). Prints one
line per kernel that fails or spills; exit status 1 if any did.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(__file__))
from test_formats_kernels import COVERED  # noqa: E402

from ptqscale.formats import get_format, kernels  # noqa: E402
from ptqscale.formats import kernels_jit as jit  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_one(kern, signature: dict, consts: dict, warps: int) -> str:
    """'' if it compiles without spilling, else why not."""
    src = ASTSource(fn=kern, signature=signature | {k: "constexpr" for k in consts},
                    constexprs=consts)
    try:
        cubin = triton.compile(src, target=TARGET, options={"num_warps": warps}).asm["cubin"]
    except Exception as err:  # noqa: BLE001 - reported
        return f"{type(err).__name__}: {str(err)[:300]}"
    if not CUOBJDUMP.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name],
                               capture_output=True, text=True).stdout
    stack = re.search(r"STACK:(\d+)", usage)
    return f"spills ({usage.strip()[-200:]})" if stack and int(stack.group(1)) else ""


def main() -> int:
    bad = []
    for name in COVERED:
        fmt = get_format(name)
        for rows, n in ((4096, 4096), (8192, 28672)):
            for kern, _, consts, warps, parts in kernels._candidates(fmt, rows, n, 132):
                c = dict(zip(kern.arg_names[7:], consts, strict=True))
                sig = {"x_ptr": "*bf16", "y_ptr": "*bf16",
                       "part_ptr": "*fp32" if parts else "*bf16",
                       "tab_ptr": "*fp32" if c["KIND"] == kernels.NF4 else "*bf16",
                       "rows": "i32", "n": "i32", "n_parts": "i32"}
                why = compile_one(kern, sig, c, warps)
                if why:
                    bad.append(f"{name} {rows}x{n} {kern.__name__} {c.get('BLOCK_R')} {warps}: {why}")
                break  # one candidate per layout keeps this fast; the GPU tests run them all
    why = compile_one(jit.amax_kernel, {"x_ptr": "*bf16", "part_ptr": "*fp32", "numel": "i32",
                                        "iters": "i32"}, {"BLOCK": kernels._AMAX_BLOCK}, 8)
    if why:
        bad.append(f"amax_kernel: {why}")
    print("\n".join(bad) or f"every kernel of {len(COVERED)} formats compiles for sm_90")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
