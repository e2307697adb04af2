"""GPTQ's fused column loop (methods/gptq_kernel.py) on the CPU, where there is no GPU.

Run by tests/methods/test_gptq_kernel.py in subprocesses. ``interpret`` (under
``TRITON_INTERPRET=1``): the kernel against the torch loop, for every element rule the format
kernels cover (INT sym / asym / per-tensor, MX int / fp, per-tensor FP8, NVFP4, NF4), with
act-order and static groups, on CPU tensors. The interpreter evaluates the kernel's float32
operations one by one (no fused multiply-adds), so Q and the error feedback are the torch
loop's bit for bit. ``compile``: the kernel compiled for sm_90 (Triton's compiled frontend, which
the interpreter does not exercise) for every rule. Prints one line per failure; exit status 1
if there was any.
"""

from __future__ import annotations

import os
import sys

import torch

from ptqscale.formats import get_format
from ptqscale.formats import kernels as fk
from ptqscale.methods import gptq, gptq_kernel

# one format per element rule (and layout: grouped, per-channel, per-tensor, odd groups)
FORMATS = ("int4_g16", "int3_g16_asym", "int8", "int8_t", "int4_g24", "fp8_e4m3", "mxfp4",
           "mxint4_b32", "nvfp4", "nf4")


def problem(rows=24, cols=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen) * 0.02
    W[3, 7] = 0.4  # an outlier that sets its group's (and the tensor's) scale
    X = torch.randn(512, cols, generator=gen) @ (torch.eye(cols) + 0.05 * torch.randn(
        cols, cols, generator=gen))
    return W, X.T @ X * (2 / X.shape[0])


def interpret(bad: list) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    # the kernel on CPU tensors: only the device check of ``supports`` stands in the way
    gptq_kernel.supports = lambda W, fmt, bs: fk.kernel_spec(fmt) is not None and bs <= 256
    W, H = problem()
    for name in FORMATS:
        for actorder, static in ((False, False), (True, False), (True, True)):
            kw = dict(blocksize=32, actorder=actorder, static_groups=static)
            Qk, ik = gptq.gptq_quantize(W, H, name, kernel="triton", **kw)
            Qt, it = gptq.gptq_quantize(W, H, name, kernel="torch", **kw)
            where = f"{name} actorder={actorder} static={static}"
            if not torch.equal(Qk, Qt):
                bad.append(f"{where}: {(Qk != Qt).sum().item()} of {Qk.numel()} values differ")
            elif ik.loss != it.loss:
                bad.append(f"{where}: loss {ik.loss} != {it.loss}")
            elif torch.equal(Qt, get_format(name).fake_quantize(W)):
                bad.append(f"{where}: GPTQ equals plain rounding (the check would be vacuous)")


def compile_sm90(bad: list) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    for name in FORMATS:
        spec = fk.kernel_spec(get_format(name))
        consts = {k: spec[k] for k in ("KIND", "LO", "HI", "FRAC", "MBITS", "EMIN")}
        consts |= dict(BS=128, BLOCK_R=gptq_kernel.BLOCK_R)
        sig = {a: "*fp32" for a in ("W_ptr", "Q_ptr", "E_ptr", "H_ptr", "S_ptr", "Z_ptr",
                                     "T_ptr")}
        sig |= {"G_ptr": "*i32", "rows": "i32", "width": "i32", "n_groups": "i32", "a": "i32",
                "b": "i32"} | {k: "constexpr" for k in consts}
        try:
            triton.compile(ASTSource(fn=gptq_kernel._block_kernel, signature=sig,
                                     constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        except Exception as err:  # noqa: BLE001 - reported
            bad.append(f"{name}: {type(err).__name__}: {str(err)[:300]}")


if __name__ == "__main__":
    failures: list[str] = []
    {"interpret": interpret, "compile": compile_sm90}[sys.argv[1]](failures)
    print("\n".join(failures) or f"{sys.argv[1]}: {len(FORMATS)} formats ok")
    sys.exit(1 if failures else 0)
