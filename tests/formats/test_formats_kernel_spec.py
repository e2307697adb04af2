"""What a format tells the fused kernel is exactly its own rule: checked on the CPU.

``Format.kernel_spec()`` is the only thing the Triton kernel knows of a format. An emulator
of the kernel's arithmetic (formats/kernels.py ``_scale`` / ``_round``, op for op in float32
torch) driven by that spec must reproduce the format's torch reference bit for bit, so a
format that states a wrong spec fails here without a GPU. A subclass that changes the rule
without restating its spec must make the kernel decline.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from test_formats_kernels import COVERED, edge_tensor

from ptqscale.formats import EXAMPLES, IntFormat, MXFormat, get_format, kernels
from ptqscale.formats.elements import _NF4_THRESHOLDS, NF4_LEVELS

NAMES = sorted(set(EXAMPLES) | set(COVERED))


def _pow2(n: torch.Tensor) -> torch.Tensor:
    return ((n + 127) << 23).to(torch.int32).view(torch.float32)


def _mul_pow2(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    half = torch.where(n >= 0, n // 2, -((1 - n) // 2))
    return x * _pow2(half) * _pow2(n - half)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int32) >> 23) - 127


def _round_mf(y: torch.Tensor, mbits: int, emin: int, hi: float) -> torch.Tensor:
    a = y.abs().clamp(max=hi)
    step = _floor_log2(a).clamp(min=emin) - mbits
    return torch.copysign(torch.round(a * _pow2(-step)) * _pow2(step), y)


def _nf4(y: torch.Tensor) -> torch.Tensor:
    """The kernel's lookup: the next level from each threshold on."""
    v = torch.full_like(y, NF4_LEVELS[0])
    for t, level in zip(_NF4_THRESHOLDS, NF4_LEVELS[1:], strict=True):
        v = torch.where(y >= t, level, v)
    return v


def emulate(spec: dict, x: torch.Tensor, g: int) -> torch.Tensor:
    """The kernel's result for a (rows, n) tensor with groups of ``g`` along the last axis."""
    rows, n = x.shape
    xg = F.pad(x.float(), (0, (-n) % g)).reshape(rows, -1, g)  # masked loads read zeros
    mn, mx = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    ta = x.float().abs().amax()  # pass 1 (read only by the TENSOR rules)
    if spec["TENSOR"] and spec["KIND"] != kernels.NVFP4:
        mn, mx = -ta, ta
    kind = spec["KIND"]
    lo_c, hi_c = spec["LO"], spec["HI"]

    def fp16(s):
        return s.clamp(2.0**-24, 65504.0).half().float()

    if kind == kernels.INT_ASYM:
        lo = mn.clamp(max=0.0)
        s = fp16(torch.where((mx.clamp(min=0.0) - lo) / spec["DIV"] > 0,
                             (mx.clamp(min=0.0) - lo) / spec["DIV"], 1.0))
        z = torch.round(-lo / s).clamp(0.0, hi_c)
        y = (torch.round(xg / s) + z).clamp(lo_c, hi_c) - z
        out = y * s
    elif kind == kernels.INT_SYM:
        s = torch.maximum(mx, -mn) / spec["DIV"]
        s = fp16(torch.where(s > 0, s, 1.0))
        out = torch.round(xg / s).clamp(lo_c, hi_c) * s
    elif kind == kernels.FP:
        s = ta / hi_c
        s = torch.where(s > 0, s, 1.0)
        out = _round_mf(xg / s, spec["MBITS"], spec["EMIN"], hi_c) * s
    elif kind == kernels.NVFP4:
        ts = ta / spec["DIV"]
        ts = torch.where(ts > 0, ts, 1.0)
        bs = _round_mf(torch.maximum(mx, -mn).abs() / hi_c / ts, 3, -6, 448.0)
        d = bs * ts
        y = torch.where(d > 0, xg / d, 0.0)
        out = _round_mf(y, spec["MBITS"], spec["EMIN"], hi_c) * bs * ts
    elif kind == kernels.NF4:
        amax = torch.maximum(mx, -mn)
        s = torch.where(amax > 0, amax, 1.0)
        out = _nf4(xg / s) * s
    else:
        amax = torch.maximum(mx, -mn)
        e = _floor_log2(amax)
        k = e - spec["EMAX"]
        if spec["CEIL"]:
            k = k + (_mul_pow2(amax, -e) > spec["TOP"]).to(torch.int32)
        k = k.clamp(-127, 127)
        y = _mul_pow2(xg, -k)
        if kind == kernels.MX_INT:
            q = torch.round(y * 2.0 ** spec["FRAC"]).clamp(-hi_c, hi_c)
            out = _mul_pow2(q, k - spec["FRAC"])
        else:
            out = _mul_pow2(_round_mf(y, spec["MBITS"], spec["EMIN"], hi_c), k)
    return out.reshape(rows, -1)[:, :n].to(x.dtype)


def test_the_kernel_covers_every_quantized_family_and_declines_the_rest():
    covered = {n for n in NAMES if kernels.kernel_spec(get_format(n)) is not None}
    assert set(COVERED) <= covered
    assert {get_format(n).family for n in covered} == {"int", "mx", "fp", "nvfp4", "nf4"}
    assert kernels.kernel_spec(get_format("int8_t_asym")) is None  # tensor min and max: declined
    assert kernels.kernel_spec(get_format("bf16")) is None


@pytest.mark.parametrize("name", [n for n in NAMES if kernels.kernel_spec(get_format(n))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_spec_reproduces_the_reference_bit_for_bit(name, dtype):
    fmt = get_format(name)
    spec = kernels.kernel_spec(fmt)
    for shape in [(8, 256), (5, 200), (3, 1000)]:
        x = edge_tensor(shape, dtype)
        g = min(fmt.scale_group_size(shape[-1]) or shape[-1], shape[-1])
        ref = fmt.fake_quantize(x, kernel="torch")
        got = emulate(spec, x, g)
        assert torch.equal(got, ref), (name, shape)
        assert torch.equal(torch.signbit(got), torch.signbit(ref)), (name, shape)


@dataclass(frozen=True, repr=False)
class _CeilInt(IntFormat):
    """A new rule (scale rounded up to a power of two) that forgot to restate its spec."""

    def _fit(self, xb, tensor_amax):
        p = super()._fit(xb, tensor_amax)
        return type(p)(torch.exp2(torch.ceil(torch.log2(p.scale))), p.zero)


@dataclass(frozen=True, repr=False)
class _RestatedMX(MXFormat):
    """A subclass that changes nothing of the rule keeps the kernel."""


def test_a_subclass_that_changes_the_rule_without_a_spec_is_declined():
    x = edge_tensor((4, 256), torch.float32)
    new = _CeilInt(bits=4, group=128)
    assert kernels.kernel_spec(new) is None
    assert not torch.equal(new.fake_quantize(x), IntFormat(bits=4, group=128).fake_quantize(x))
    assert kernels.kernel_spec(_RestatedMX()) == kernels.kernel_spec(MXFormat())


def test_formats_answer_what_methods_ask():
    assert get_format("int4_g32").learnable_scale and get_format("nf4").learnable_scale
    assert not get_format("mxfp4").learnable_scale and not get_format("nvfp4").learnable_scale
    s = torch.tensor([1e-3 + 1e-9, 70000.0, 0.0])
    assert torch.equal(get_format("int4_g32").round_scale(s), s.clamp(2.0**-24, 65504).half().float())
    with pytest.raises(NotImplementedError, match="mxfp4"):
        get_format("mxfp4").round_scale(s)
    y = torch.tensor([0.4, 0.5, 1.5, -200.0, 3.3])
    assert torch.equal(get_format("int8").round_elements(y), torch.tensor([0.0, 0.0, 2.0, -127.0, 3.0]))
    assert get_format("fp8_e4m3").round_elements(torch.tensor([500.0])).item() == 448.0
    assert not get_format("int8_asym").element_type and get_format("int8").element_type
    W = torch.randn(3, 70)
    fmt = get_format("int4_g32")
    assert fmt.to_groups(W).shape == (9, 32) and fmt.group_length(70) == 32
    assert torch.equal(fmt.from_groups(fmt.to_groups(W), 3, 70), W)
