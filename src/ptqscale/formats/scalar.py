"""Formats with real-valued scales: the 16-bit baselines, INT and per-tensor minifloats.

Example:
    >>> IntFormat(bits=4, group=128).name, FloatFormat(MinifloatSpec(4, 3)).name
    ('int4_g128', 'fp8_e4m3')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .base import Encoded, Format, GroupParams, finite_mask
from .elements import (
    MinifloatSpec,
    codes_to_minifloat,
    div_exact,
    minifloat_to_codes,
    round_float,
    round_minifloat,
)

_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive (subnormal) fp16
# (mantissa bits, exponent of the smallest normal, largest finite) of IEEE fp16 and bfloat16
_FP16 = (10, -14, _FP16_MAX)
_BF16 = (7, -126, float(torch.finfo(torch.bfloat16).max))


def to_fp16(s: torch.Tensor) -> torch.Tensor:
    """Scales as stored: fp16 (round to nearest, clamped to its positive range), back in float32.

    Nearest (not up) keeps re-quantization exact: amax = qmax * s16 maps back to s16. The
    cost, amax / s16 <= qmax * (1 + 2**-11), still rounds to qmax for b <= 8 bits (error < 1/2
    step). Groups with absmax below ~1e-5 lose scale resolution in fp16 (as stored models do).
    """
    return round_float(s.clamp(_FP16_TINY, _FP16_MAX), *_FP16)


def _guard(s: torch.Tensor) -> torch.Tensor:
    """An all-zero group gets scale 1 (any scale represents it exactly) instead of 0/0."""
    return torch.where(s > 0, s, torch.ones_like(s))


@dataclass(frozen=True, repr=False)
class BaselineFormat(Format):
    """``bf16`` / ``fp16``: a plain cast (the unquantized reference of every study)."""

    dtype_name: str = "bf16"

    family = "baseline"
    element_bits = 16
    scale_rule = "none"
    codes_hold_non_finite = True  # the raw 16-bit patterns: a cast keeps NaN and inf

    def __post_init__(self) -> None:
        if self.dtype_name not in ("bf16", "fp16"):
            raise ValueError(f"baseline dtype {self.dtype_name!r}: allowed 'bf16', 'fp16'")

    @property
    def name(self) -> str:
        return self.dtype_name

    @property
    def element_name(self) -> str:
        return self.dtype_name

    @property
    def _dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype_name == "bf16" else torch.float16

    @property
    def element_max(self) -> float:
        return torch.finfo(self._dtype).max

    def exact_on(self, dtype: torch.dtype) -> bool:
        return dtype == self._dtype

    def _fit(self, xb, tensor_amax):
        return GroupParams(torch.ones((), device=xb.device))

    def _fake(self, xb, p):
        # = xb.to(dtype).float(), written so that torch.compile cannot elide the rounding
        return round_float(xb, *(_BF16 if self.dtype_name == "bf16" else _FP16), saturate=False)

    def _codes(self, xb, p):
        return xb.to(self._dtype).view(torch.int16)  # the raw 16-bit patterns

    def _values(self, codes, p):
        return codes.view(self._dtype).to(torch.float32)

    def _store(self, p):
        return None, None, None

    def _load(self, enc: Encoded) -> GroupParams:
        return GroupParams(torch.ones(()))


@dataclass(frozen=True, repr=False)
class IntFormat(Format):
    """b-bit integers (b in 2..8), an fp16 scale per tensor / channel / group of ``group``.

    ``mode``: ``sym`` codes in +-(2**(b-1)-1), scale = amax / (2**(b-1)-1);
    ``full`` codes in [-2**(b-1), 2**(b-1)-1], scale = 2*amax / (2**b - 1) (GPTQ's symmetric
    grid: zero point fixed at mid-range); ``asym`` codes in [0, 2**b-1] with a b-bit zero
    point, range [min(x, 0), max(x, 0)], scale = (max - min) / (2**b - 1).
    """

    bits: int = 8
    group: int | None = None
    per_tensor: bool = False
    mode: str = "sym"

    family = "int"
    scale_format = "fp16"
    scale_bits = 16
    learnable_scale = True

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"int bits={self.bits!r}: allowed 2..8")
        if self.mode not in ("sym", "full", "asym"):
            raise ValueError(f"int mode={self.mode!r}: allowed 'sym', 'full', 'asym'")
        if self.group is not None and (not isinstance(self.group, int) or self.group < 2):
            raise ValueError(f"int group={self.group!r}: allowed None or an integer >= 2")
        if self.per_tensor and self.group is not None:
            raise ValueError("int: per_tensor and group are mutually exclusive")

    @property
    def name(self) -> str:
        gran = "_t" if self.per_tensor else (f"_g{self.group}" if self.group else "")
        return f"int{self.bits}{gran}" + ("" if self.mode == "sym" else f"_{self.mode}")

    element_bits = property(lambda self: self.bits)
    block_size = property(lambda self: self.group)
    zero_bits = property(lambda self: self.bits if self.mode == "asym" else 0)
    symmetric = property(lambda self: self.mode != "asym")
    element_name = property(lambda self: f"int{self.bits}")
    element_max = property(lambda self: float(self._hi))
    # ``int<b>``: symmetric, one scale per row, which activation schemes place themselves
    element_type = property(lambda self: self.group is None and not self.per_tensor
                            and self.mode == "sym")

    def round_scale(self, s: torch.Tensor) -> torch.Tensor:
        return to_fp16(s)

    def round_elements(self, y: torch.Tensor) -> torch.Tensor:
        if not self.element_type:
            return super().round_elements(y)
        return torch.where(finite_mask(y), torch.round(y).clamp(self._lo, self._hi), y)

    def kernel_spec(self) -> dict | None:
        if self.per_tensor and self.mode == "asym":  # would need the tensor's min and max
            return None
        if self.mode == "asym":
            return kernels.spec(KIND=kernels.INT_ASYM, HI=float(self._hi),
                                DIV=float(2**self.bits - 1))
        div = 2 ** (self.bits - 1) - (1.0 if self.mode == "sym" else 0.5)
        return kernels.spec(KIND=kernels.INT_SYM, LO=float(self._lo), HI=float(self._hi), DIV=div,
                            TENSOR=self.per_tensor)

    @property
    def _lo(self) -> int:
        return {"sym": -(2 ** (self.bits - 1) - 1), "full": -(2 ** (self.bits - 1)),
                "asym": 0}[self.mode]

    @property
    def _hi(self) -> int:
        return 2**self.bits - 1 if self.mode == "asym" else 2 ** (self.bits - 1) - 1

    def _fit(self, xb, tensor_amax):
        if self.mode != "asym":
            div = 2 ** (self.bits - 1) - (1.0 if self.mode == "sym" else 0.5)
            return GroupParams(to_fp16(_guard(div_exact(self._amax(xb), div))))
        dims = tuple(range(xb.ndim)) if self.per_tensor else (-1,)
        lo = xb.amin(dim=dims, keepdim=True).clamp(max=0)
        hi = xb.amax(dim=dims, keepdim=True).clamp(min=0)
        s = to_fp16(_guard(div_exact(hi - lo, 2**self.bits - 1)))
        return GroupParams(s, torch.round(-lo / s).clamp(0, 2**self.bits - 1))

    def _round(self, xb, p):
        k = torch.round(xb / p.scale)
        return (k if p.zero is None else k + p.zero).clamp(self._lo, self._hi)

    def _fake(self, xb, p):
        k = self._round(xb, p)
        return (k if p.zero is None else k - p.zero) * p.scale

    def _codes(self, xb, p):
        return self._round(xb, p).to(torch.uint8 if self.mode == "asym" else torch.int8)

    def _values(self, codes, p):
        k = codes.to(torch.float32)
        return (k if p.zero is None else k - p.zero) * p.scale

    def _store(self, p):
        zero = None if p.zero is None else p.zero.to(torch.int32)
        return p.scale.to(torch.float16), zero, None  # exact: the scale is already fp16

    def _load(self, enc: Encoded) -> GroupParams:
        zero = None if enc.zero is None else enc.zero.to(torch.float32)
        return GroupParams(enc.scale.to(torch.float32), zero)


@dataclass(frozen=True, repr=False)
class FloatFormat(Format):
    """A minifloat with one float32 scale per tensor: scale = amax / element max.

    The tensor's absmax maps onto the element's largest finite value (current scaling, as
    FP8 recipes do), then every element rounds to nearest-even and saturates.
    """

    spec: MinifloatSpec = MinifloatSpec(4, 3)

    family = "fp"
    per_tensor = True
    scale_format = "fp32"
    scale_bits = 32
    learnable_scale = True
    element_type = True

    @property
    def name(self) -> str:
        return f"fp{self.spec.bits}_{self.spec.name}"

    element_bits = property(lambda self: self.spec.bits)
    element_name = property(lambda self: self.spec.name)
    element_max = property(lambda self: self.spec.max_value)

    def round_scale(self, s: torch.Tensor) -> torch.Tensor:
        return s  # stored as float32

    def round_elements(self, y: torch.Tensor) -> torch.Tensor:
        return torch.where(finite_mask(y), round_minifloat(y, self.spec), y)

    def kernel_spec(self) -> dict | None:
        return kernels.spec(KIND=kernels.FP, MBITS=self.spec.mbits, EMIN=self.spec.emin,
                            HI=self.spec.max_value, TENSOR=True)

    def _fit(self, xb, tensor_amax):
        return GroupParams(_guard(div_exact(self._amax(xb), self.spec.max_value)))

    def _fake(self, xb, p):
        return round_minifloat(xb / p.scale, self.spec) * p.scale

    def _codes(self, xb, p):
        return minifloat_to_codes(round_minifloat(xb / p.scale, self.spec), self.spec)

    def _values(self, codes, p):
        return codes_to_minifloat(codes, self.spec) * p.scale
