"""Block-scaled formats: OCP Microscaling (and its generalization), NVFP4 and NF4.

Example:
    >>> MXFormat(FixedPointSpec(4, 2), block=128).name, NF4Format().bits_per_weight
    ('mxint4_b128', 4.5)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .base import Encoded, Format, GroupParams
from .elements import (
    FixedPointSpec,
    MinifloatSpec,
    codes_to_minifloat,
    div_exact,
    floor_log2,
    minifloat_to_codes,
    mul_pow2,
    nf4_values,
    round_minifloat,
    round_nf4,
)

E2M1 = MinifloatSpec(2, 1)
E4M3 = MinifloatSpec(4, 3)
# The concrete formats of OCP MX v1.0 (block 32); their names carry no "_b32".
OCP_MX_ELEMENTS = (MinifloatSpec(4, 3), MinifloatSpec(5, 2), MinifloatSpec(3, 2),
                   MinifloatSpec(2, 3), E2M1, FixedPointSpec(8, 6))
E8M0_BIAS = 127
# MX shared-scale rules and their name suffixes (MXFormat's docstring says what each does)
SCALE_RULES = {"floor": "", "ceil": "_ru", "round": "_rn"}


@dataclass(frozen=True, repr=False)
class MXFormat(Format):
    """Microscaling: ``block`` elements along the axis share one E8M0 scale 2**k.

    OCP MX v1.0 rule (``scale_rule="floor"``): k = floor(log2(amax)) - emax_elem, clamped to
    the E8M0 range [-127, 127]; elements are amax-relative values rounded to nearest-even
    and saturated (amax can exceed the element max by < 2x and is then clipped).
    ``scale_rule="ceil"`` (name suffix ``_ru``) rounds the scale up instead: the smallest
    2**k with amax / 2**k <= element max, so nothing saturates. ``scale_rule="round"`` (suffix
    ``_rn``) is compressed-tensors' (llm-compressor's) rule: amax rounded to one mantissa bit
    (halves up) before the OCP rule, i.e. one binade up iff amax's mantissa is >= 1.75.
    """

    element: MinifloatSpec | FixedPointSpec = E2M1
    block: int = 32
    scale_rule: str = "floor"

    family = "mx"
    scale_format = "e8m0"
    scale_bits = 8

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or self.block < 2:
            raise ValueError(f"mx block={self.block!r}: allowed an integer >= 2")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"mx scale_rule={self.scale_rule!r}: allowed {list(SCALE_RULES)}")
        if isinstance(self.element, FixedPointSpec) and (
                self.element.frac_bits != self.element.bits - 2 or self.element.bits > 8):
            raise ValueError(f"mxint element {self.element}: need bits <= 8, frac_bits = bits - 2")

    @property
    def is_int(self) -> bool:
        return isinstance(self.element, FixedPointSpec)

    @property
    def name(self) -> str:
        e = self.element
        base = f"mxint{e.bits}" if self.is_int else f"mxfp{e.bits}"
        if not self.is_int and e != E2M1:
            base += f"_{e.name}"
        ocp = e in OCP_MX_ELEMENTS and self.block == 32
        return base + ("" if ocp else f"_b{self.block}") + SCALE_RULES[self.scale_rule]

    element_bits = property(lambda self: self.element.bits)
    block_size = property(lambda self: self.block)
    element_max = property(lambda self: self.element.max_value)

    @property
    def element_name(self) -> str:
        return f"int{self.element.bits}" if self.is_int else self.element.name

    def kernel_spec(self) -> dict | None:
        if self.scale_rule == "round":  # not a rule of the kernel: the torch reference runs
            return None
        e = self.element
        rule = dict(EMAX=e.emax, CEIL=self.scale_rule == "ceil", TOP=e.max_value / 2.0**e.emax)
        if self.is_int:
            return kernels.spec(KIND=kernels.MX_INT, FRAC=e.frac_bits, HI=float(e.qmax), **rule)
        return kernels.spec(KIND=kernels.MX_FP, MBITS=e.mbits, EMIN=e.emin, HI=e.max_value,
                            **rule)

    def _fit(self, xb, tensor_amax):
        amax = self._amax(xb)
        e = floor_log2(amax)
        k = e - self.element.emax
        if self.scale_rule == "ceil":  # amax = m * 2**e; one binade up iff m > mantissa of max
            top = self.element.max_value / 2.0**self.element.emax
            k = k + (mul_pow2(amax, -e) > top).to(k.dtype)
        elif self.scale_rule == "round":  # compressed-tensors' round_to_power_2, then floor
            k = k + (mul_pow2(amax, -e) >= 1.75).to(k.dtype)
        return GroupParams(k.clamp(-E8M0_BIAS, E8M0_BIAS))

    def _fake(self, xb, p):
        y = mul_pow2(xb, -p.scale)  # exact: power-of-two scale
        if self.is_int:
            f = self.element.frac_bits
            q = torch.round(y * 2.0**f).clamp(-self.element.qmax, self.element.qmax)
            return mul_pow2(q, p.scale - f)
        return mul_pow2(round_minifloat(y, self.element), p.scale)

    def _codes(self, xb, p):
        y = mul_pow2(xb, -p.scale)
        if self.is_int:
            f = self.element.frac_bits
            return torch.round(y * 2.0**f).clamp(-self.element.qmax, self.element.qmax).to(torch.int8)
        return minifloat_to_codes(round_minifloat(y, self.element), self.element)

    def _values(self, codes, p):
        if self.is_int:
            return mul_pow2(codes.to(torch.float32), p.scale - self.element.frac_bits)
        return mul_pow2(codes_to_minifloat(codes, self.element), p.scale)

    def _store(self, p):
        return (p.scale + E8M0_BIAS).to(torch.uint8), None, None  # E8M0 code = k + 127

    def _load(self, enc: Encoded) -> GroupParams:
        return GroupParams(enc.scale.to(torch.int32) - E8M0_BIAS)


@dataclass(frozen=True, repr=False)
class NVFP4Format(Format):
    """NVIDIA NVFP4: E2M1 elements, an E4M3 scale per 16, one float32 scale per tensor.

    tensor_scale = amax / (6 * 448); block_scale = E4M3((amax_block / 6) / tensor_scale);
    element = E2M1(x / (block_scale * tensor_scale)); value = (element * block_scale) * tensor_scale.
    """

    family = "nvfp4"
    element_bits = 4
    block_size = 16
    scale_format = "e4m3"
    scale_bits = 8
    needs_tensor_amax = True
    element_name = "e2m1"
    element_max = 6.0
    scale_rule = "two_level"

    @property
    def name(self) -> str:
        return "nvfp4"

    def kernel_spec(self) -> dict | None:
        return kernels.spec(KIND=kernels.NVFP4, MBITS=E2M1.mbits, EMIN=E2M1.emin,
                            HI=E2M1.max_value, DIV=E2M1.max_value * E4M3.max_value, TENSOR=True)

    def _fit(self, xb, tensor_amax):
        ta = xb.abs().amax() if tensor_amax is None else tensor_amax.to(xb.device)
        ts = div_exact(ta, E2M1.max_value * E4M3.max_value)
        ts = torch.where(ts > 0, ts, torch.ones_like(ts))
        bs = round_minifloat(div_exact(self._amax(xb), E2M1.max_value) / ts, E4M3)
        return GroupParams(bs, tensor_scale=ts)

    def _elements(self, xb, p):
        d = p.scale * p.tensor_scale
        y = torch.where(d > 0, xb / d, torch.zeros_like(xb))  # a zero block scale: all zeros
        return round_minifloat(y, E2M1)

    def _fake(self, xb, p):
        return self._elements(xb, p) * p.scale * p.tensor_scale

    def _codes(self, xb, p):
        return minifloat_to_codes(self._elements(xb, p), E2M1)

    def _values(self, codes, p):
        return codes_to_minifloat(codes, E2M1) * p.scale * p.tensor_scale

    def _store(self, p):
        return minifloat_to_codes(p.scale, E4M3), None, p.tensor_scale

    def _load(self, enc: Encoded) -> GroupParams:
        return GroupParams(codes_to_minifloat(enc.scale, E4M3), tensor_scale=enc.tensor_scale)


@dataclass(frozen=True, repr=False)
class NF4Format(Format):
    """QLoRA NormalFloat-4: nearest of 16 fixed levels in [-1, 1] times the block's absmax (fp32).

    No double quantization: the absmax is stored as float32 (4 + 32/64 = 4.5 bits per weight).
    """

    block: int = 64

    family = "nf4"
    element_bits = 4
    scale_format = "fp32"
    scale_bits = 32
    learnable_scale = True
    element_name = "nf4"
    element_max = 1.0
    symmetric = False  # 7 negative and 8 positive levels

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or self.block < 2:
            raise ValueError(f"nf4 block={self.block!r}: allowed an integer >= 2")

    @property
    def name(self) -> str:
        return "nf4" if self.block == 64 else f"nf4_b{self.block}"

    block_size = property(lambda self: self.block)

    def round_scale(self, s: torch.Tensor) -> torch.Tensor:
        return s  # the block absmax is stored as float32

    def kernel_spec(self) -> dict | None:
        return kernels.spec(KIND=kernels.NF4)

    def _fit(self, xb, tensor_amax):
        a = self._amax(xb)
        return GroupParams(torch.where(a > 0, a, torch.ones_like(a)))

    def _fake(self, xb, p):
        return nf4_values(round_nf4(xb / p.scale)) * p.scale

    def _codes(self, xb, p):
        return round_nf4(xb / p.scale)

    def _values(self, codes, p):
        return nf4_values(codes) * p.scale
