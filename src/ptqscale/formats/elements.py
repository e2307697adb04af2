"""Element formats: the scalar grids that every scaled format rounds onto.

- :class:`MinifloatSpec` — sign + E exponent bits + M mantissa bits with subnormals (eXmY).
- :class:`FixedPointSpec` — signed integers ``k * 2**-frac_bits`` with a symmetric clamp
  (``|k| <= 2**(bits-1) - 1``); plain INT is ``frac_bits = 0``, an MXINT-b element has
  ``frac_bits = b - 2``.
- ``NF4_LEVELS`` — the 16 NormalFloat levels of QLoRA (bitsandbytes' exact float32 table).

Every rounding here takes and returns float32, rounds to nearest with ties to even, and
saturates (clamps to the largest finite magnitude) instead of overflowing. Rounding uses the
fp32 bit pattern (exponent field) and power-of-two multiplies only, so it is exact and fuses
into a single kernel under ``torch.compile``.

Example:
    >>> spec = MinifloatSpec(4, 3)          # OCP FP8 E4M3
    >>> spec.max_value, round_minifloat(torch.tensor([500.0, 0.3]), spec).tolist()
    (448.0, [448.0, 0.3125])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# QLoRA's NF4 table, copied from bitsandbytes (functional.get_4bit_type("nf4")), exact fp32 values.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

_F32_BIAS = 127
_F32_MANT = 23


def pow2(n: torch.Tensor) -> torch.Tensor:
    """2**n as float32 for integer tensors n in [-126, 127], built from the bit pattern (exact)."""
    return ((n.to(torch.int32) + _F32_BIAS) << _F32_MANT).view(torch.float32)


def mul_pow2(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """x * 2**n for integer n in [-252, 254], exact: two normal power-of-two factors, no pow()."""
    half = torch.div(n, 2, rounding_mode="floor")
    return x * pow2(half) * pow2(n - half)


def div_exact(a: torch.Tensor, d: float) -> torch.Tensor:
    """``a / d`` correctly rounded on every device.

    CUDA kernels turn division by a Python number into multiplication by its rounded
    reciprocal (``amax / 6`` is then off by an ulp from CPU and from the spec), so the divisor
    goes in as a tensor on ``a``'s device.
    """
    return a / torch.full((), d, dtype=a.dtype, device=a.device)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for float32 a > 0 read from the exponent field (int32); -127 for a <= 2**-127.

    Why not ``torch.log2``: it is not exact near powers of two, and a wrong binade changes
    the rounding step or an MX shared scale.
    """
    return (a.view(torch.int32) >> _F32_MANT) - _F32_BIAS


@dataclass(frozen=True)
class MinifloatSpec:
    """An eXmY minifloat with the OCP conventions.

    ``e4m3`` is OCP FP8 E4M3 (no infinities; S.1111.111 is NaN; max 448); ``e5m2`` is OCP FP8
    E5M2 (IEEE-like: the top exponent is inf/NaN; max 57344); every other eXmY uses every
    code for finite values, as OCP FP6 E3M2 / E2M3 and FP4 E2M1 do (max 28, 7.5, 6).
    """

    ebits: int
    mbits: int

    def __post_init__(self) -> None:
        if not (2 <= self.ebits <= 6 and 1 <= self.mbits <= 7 and 4 <= self.bits <= 8):
            raise ValueError(
                f"minifloat e{self.ebits}m{self.mbits}: need 2 <= E <= 6, 1 <= M <= 7 and "
                f"4 <= 1+E+M <= 8 bits")

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def name(self) -> str:
        return f"e{self.ebits}m{self.mbits}"

    @property
    def bias(self) -> int:
        return 2 ** (self.ebits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (subnormals share its step 2**(emin - M))."""
        return 1 - self.bias

    @property
    def convention(self) -> str:
        return {"e4m3": "ocp_fn", "e5m2": "ieee"}.get(self.name, "finite")

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value (the OCP "emax" of the element format)."""
        top_field = 2**self.ebits - 1 - (self.convention == "ieee")
        return top_field - self.bias

    @property
    def max_value(self) -> float:
        # OCP E4M3 gives up mantissa 111 of the top exponent to NaN: 1.110b instead of 1.111b
        top_mant = 2**self.mbits - 1 - (self.convention == "ocp_fn")
        return math.ldexp(1.0 + top_mant / 2**self.mbits, self.emax)


def round_float(y: torch.Tensor, mbits: int, emin: int, vmax: float,
                saturate: bool = True) -> torch.Tensor:
    """Round float32 ``y`` to a binary float grid: ``mbits`` mantissa bits, subnormals below
    2**emin, largest finite ``vmax``; nearest, ties to even; keeps -0 and NaN.

    ``saturate``: clamp to +-vmax (the quantizers' rule); else overflow gives +-inf (a cast).
    Written with bit operations and power-of-two multiplies, not dtype casts, so that
    torch.compile cannot elide it (Inductor drops downcast-upcast pairs by default).
    """
    a = y.abs()
    if saturate:
        a = a.clamp(max=vmax)
    step_exp = floor_log2(a).clamp(min=emin) - mbits  # grid step of a's binade (or subnormals)
    if emin - mbits >= -126:  # every step is a normal fp32 power of two
        q = torch.round(a * pow2(-step_exp)) * pow2(step_exp)  # torch.round: half to even
    else:
        q = mul_pow2(torch.round(mul_pow2(a, -step_exp)), step_exp)
    if not saturate:
        q = torch.where(q > vmax, torch.inf, q)
    return torch.copysign(q, y)


def round_minifloat(y: torch.Tensor, spec: MinifloatSpec) -> torch.Tensor:
    """Round float32 ``y`` to the nearest value of ``spec`` (ties to even), saturating; keeps -0."""
    return round_float(y, spec.mbits, spec.emin, spec.max_value)


def minifloat_to_codes(q: torch.Tensor, spec: MinifloatSpec) -> torch.Tensor:
    """Bit patterns (uint8, sign|exponent|mantissa) of float32 values already on the grid."""
    a = q.abs()
    e = floor_log2(a).clamp(min=spec.emin)
    normal = a >= 2.0**spec.emin
    field = torch.where(normal, e + spec.bias, torch.zeros_like(e))
    mant = (a * pow2(spec.mbits - e)).to(torch.int32) - normal.to(torch.int32) * 2**spec.mbits
    sign = torch.signbit(q).to(torch.int32) << (spec.ebits + spec.mbits)
    return (sign | (field << spec.mbits) | mant).to(torch.uint8)


def codes_to_minifloat(codes: torch.Tensor, spec: MinifloatSpec) -> torch.Tensor:
    """float32 values of minifloat bit patterns (NaN/inf for the special codes of e4m3/e5m2)."""
    c = codes.to(torch.int32)
    mant = c & (2**spec.mbits - 1)
    field = (c >> spec.mbits) & (2**spec.ebits - 1)
    normal = field > 0
    e = torch.where(normal, field - spec.bias, torch.full_like(field, spec.emin))
    sig = mant + normal.to(torch.int32) * 2**spec.mbits
    val = sig.to(torch.float32) * pow2(e - spec.mbits)
    top = field == 2**spec.ebits - 1
    if spec.convention == "ocp_fn":
        val = torch.where(top & (mant == 2**spec.mbits - 1), torch.nan, val)
    elif spec.convention == "ieee":
        val = torch.where(top, torch.where(mant == 0, torch.inf, torch.nan), val)
    negative = ((c >> (spec.ebits + spec.mbits)) & 1).bool()
    return torch.where(negative, -val, val)


@dataclass(frozen=True)
class FixedPointSpec:
    """Signed fixed point: values ``k * 2**-frac_bits``, ``|k| <= 2**(bits-1) - 1``.

    INT-b symmetric elements are ``FixedPointSpec(b, 0)``; MXINT-b elements are
    ``FixedPointSpec(b, b - 2)`` (MXINT8: 1.6 fixed point, max 127/64 = 1.984375).
    """

    bits: int
    frac_bits: int

    def __post_init__(self) -> None:
        if not (2 <= self.bits <= 16 and 0 <= self.frac_bits <= 16):
            raise ValueError(f"fixed point: bits={self.bits} not in 2..16 or "
                             f"frac_bits={self.frac_bits} not in 0..16")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def max_value(self) -> float:
        return math.ldexp(self.qmax, -self.frac_bits)

    @property
    def emax(self) -> int:
        """floor(log2(max_value)): 0 for every MXINT element (max in [1, 2))."""
        return math.frexp(self.max_value)[1] - 1


def round_fixed_point(y: torch.Tensor, spec: FixedPointSpec) -> torch.Tensor:
    """Integer codes (int32) of float32 ``y``: round half to even, clamp to +-qmax."""
    k = torch.round(y * 2.0**spec.frac_bits)
    return k.clamp(-spec.qmax, spec.qmax).to(torch.int32)


def _nf4_thresholds() -> tuple[float, ...]:
    """Smallest float32 strictly above each exact midpoint of neighbouring NF4 levels.

    The midpoints need 25 bits, so comparing against their fp32 roundings would misplace
    inputs within one ulp of them; ``y >= threshold`` is the exact test ``y > midpoint``.
    """
    lv = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    mid = (lv[1:] + lv[:-1]) / 2  # exact in float64
    c = mid.to(torch.float32)
    up = torch.where(c.to(torch.float64) > mid, c, torch.nextafter(c, torch.full_like(c, math.inf)))
    return tuple(up.tolist())


_NF4_THRESHOLDS = _nf4_thresholds()


def round_nf4(y: torch.Tensor) -> torch.Tensor:
    """Index (uint8, 0..15) of the NF4 level nearest to float32 ``y``; an exact tie picks the lower.

    (bitsandbytes, too, takes the upper level only when ``y`` is above the midpoint.)
    """
    t = torch.tensor(_NF4_THRESHOLDS, dtype=torch.float32, device=y.device)
    return torch.bucketize(y.contiguous(), t, right=True).to(torch.uint8)


def nf4_values(idx: torch.Tensor) -> torch.Tensor:
    """float32 NF4 level of each index."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=idx.device)
    return levels[idx.long()]
