"""GPTQ's fused column loop (methods/gptq_kernel.py) against the torch loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptqscale.errors import ConfigError
from ptqscale.formats.scalar import BaselineFormat
from ptqscale.methods.capture import HessianAccumulator
from ptqscale.methods.gptq import GPTQConfig, gptq_quantize


def problem(rows=96, cols=640, seed=0):
    """Weights and a correlated, well-conditioned Hessian 2/n X^T X."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen) * 0.02
    X = torch.randn(2048, cols, generator=gen) @ (torch.eye(cols) + 0.05 * torch.randn(
        cols, cols, generator=gen))
    return W, X.T @ X * (2 / X.shape[0])


def test_bad_kernel_values_are_clear_errors():
    W, H = problem(rows=4, cols=32)
    with pytest.raises(ConfigError, match="method.kernel='cuda'"):
        GPTQConfig(kernel="cuda")
    with pytest.raises(ValueError, match="kernel='triton' cannot run here"):
        gptq_quantize(W, H, "int4_g16", blocksize=16, kernel="triton")  # CPU tensors
    assert "kernel" in GPTQConfig().settings() and "kernel" in GPTQConfig.not_in_key


@pytest.mark.gpu
@pytest.mark.parametrize("name,actorder,static", [
    ("int4_g128", False, False), ("int4_g128_full", True, True), ("int3_g64_asym", True, False),
    ("int8", False, False), ("mxfp4", True, False), ("mxint4_b32", False, False),
    ("int4_g100", True, False), ("int8_t", True, False), ("fp8_e4m3", False, False),
    ("nvfp4", True, False), ("nf4", False, True)])
def test_kernel_matches_torch_loop(name, actorder, static):
    W, H = problem()
    kw = dict(blocksize=128, actorder=actorder, static_groups=static)
    Qk, ik = gptq_quantize(W.cuda(), H.cuda(), name, kernel="triton", **kw)
    Qt, it = gptq_quantize(W.cuda(), H.cuda(), name, kernel="torch", **kw)
    # fused multiply-adds may move a value across a rounding boundary now and then
    assert (Qk != Qt).float().mean().item() < 2e-3
    assert ik.loss == pytest.approx(it.loss, rel=1e-4)
    R = gptq_quantize(W.cuda(), torch.eye(W.shape[1]).cuda(), name, kernel="triton", **kw)[0]
    assert (R != Qt).any()  # the Hessian matters: not a plain rounding


def _check(mode: str, **env) -> None:
    """tests/methods/gptq_kernel_interpret_check.py in a subprocess (the interpreter is chosen
    when the kernel is decorated, at import)."""
    script = Path(__file__).with_name("gptq_kernel_interpret_check.py")
    out = subprocess.run([sys.executable, "-W", "ignore", str(script), mode],
                         env=os.environ | env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_interpreted_kernel_is_bitwise_the_torch_loop():
    """Every element rule (FP8, NVFP4 and NF4 included), act-order and static groups: the
    kernel's Q and loss are the torch loop's, bit for bit, under Triton's interpreter."""
    pytest.importorskip("triton")
    _check("interpret", TRITON_INTERPRET="1")


@pytest.mark.slow
def test_kernel_compiles_for_sm90_for_every_rule():
    pytest.importorskip("triton")
    _check("compile")


def test_gptq_into_the_weights_own_dtype_skips_the_sweep_exactly(monkeypatch):
    """bf16 into a bf16 matrix: Q is W (a dead column zeroed, as always) and the loss 0,
    exactly what the full column sweep gives. An fp32 matrix is not on bf16's grid: swept."""
    W, H = problem(rows=16, cols=64)
    W = W.to(torch.bfloat16)
    H[5, :] = H[:, 5] = 0  # a dead input: GPTQ zeroes its column
    Q, info = gptq_quantize(W, H, "bf16", blocksize=16, actorder=True, kernel="torch")
    expected = W.clone()
    expected[:, 5] = 0
    assert torch.equal(Q, expected) and info.loss == 0.0 and info.dead_columns == 1
    monkeypatch.setattr(BaselineFormat, "exact_on", lambda self, dtype: False)
    Qs, infos = gptq_quantize(W, H, "bf16", blocksize=16, actorder=True, kernel="torch")
    assert torch.equal(Qs, Q) and infos.loss == 0.0
    W32 = W.float() + 1e-5 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1))
    assert gptq_quantize(W32, H, "bf16", blocksize=16, kernel="torch")[1].loss > 0


@pytest.mark.gpu
def test_cuda_16bit_hessian_equals_fp32_sum():
    x = torch.randn(4, 512, 256, device="cuda").to(torch.bfloat16)
    fast, ref = HessianAccumulator(256, x.device), HessianAccumulator(256, x.device)
    fast.add(x)
    ref.sum.addmm_(x.reshape(-1, 256).float().T, x.reshape(-1, 256).float())
    ref.tokens = fast.tokens
    torch.testing.assert_close(fast.hessian(), ref.hessian(), rtol=1e-5, atol=1e-5)
