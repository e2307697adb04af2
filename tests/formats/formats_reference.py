"""Slow, obviously-correct reference implementations of every format (numpy, loops, brute force).

Independent of the fast path: element grids are enumerated from the bit layout with Python
floats, rounding is "nearest grid value, exact ties to the even code", blocks are looped over.
Scale arithmetic is done in numpy float32 exactly where the format defines it in float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

F32 = np.float32

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def minifloat_table(e: int, m: int) -> dict[int, float]:
    """code -> value for every code of eXmY (NaN / inf included), from the bit layout."""
    bias = 2 ** (e - 1) - 1
    table = {}
    for code in range(2 ** (1 + e + m)):
        sign, field, mant = code >> (e + m), (code >> m) & (2**e - 1), code & (2**m - 1)
        if field == 0:
            v = mant / 2**m * 2.0 ** (1 - bias)  # subnormal
        else:
            v = (1 + mant / 2**m) * 2.0 ** (field - bias)
        if (e, m) == (4, 3) and field == 15 and mant == 7:
            v = math.nan
        if (e, m) == (5, 2) and field == 31:
            v = math.inf if mant == 0 else math.nan
        table[code] = -v if sign else v
    return table


def nonneg_grid(e: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, codes) of the finite non-negative values (+0 only), sorted."""
    items = sorted((v, c) for c, v in minifloat_table(e, m).items()
                   if math.isfinite(v) and v >= 0 and not (v == 0 and c != 0))
    return np.array([v for v, _ in items]), np.array([c for _, c in items])


def round_grid(y, values, codes) -> np.ndarray:
    """Nearest of the non-negative ``values`` to |y| (saturating), exact ties to the even code."""
    y = np.asarray(y, dtype=np.float64)
    a = np.minimum(np.abs(y), values[-1])[..., None]
    d = np.abs(values - a)  # exact in float64 for fp32 inputs and these small grids
    best = d == d.min(axis=-1, keepdims=True)
    # among the nearest (one, or two on an exact tie) prefer the even code
    pick = np.argmax(best & (codes % 2 == 0), axis=-1)
    pick = np.where((best & (codes % 2 == 0)).any(-1), pick, np.argmax(best, axis=-1))
    return np.copysign(values[pick], y)


def round_minifloat(y, e, m):
    return round_grid(y, *nonneg_grid(e, m))


def _fp16(s):
    return F32(np.float16(F32(min(max(s, 2.0**-24), 65504.0))))


def _groups(x, group):
    """Yield (row, slice) of each group of a 2-D float32 array, the last group possibly short."""
    rows, n = x.shape
    g = group or n
    for r in range(rows):
        for j in range(0, n, g):
            yield r, slice(j, min(j + g, n))


def ref_int(x, bits, group=None, per_tensor=False, mode="sym"):
    x = np.asarray(x, dtype=F32)
    out = np.empty_like(x)
    spans = [(slice(None), slice(None))] if per_tensor else list(_groups(x, group))
    for r, sl in spans:
        v = x[r, sl]
        if mode == "asym":
            lo, hi = min(F32(v.min()), F32(0)), max(F32(v.max()), F32(0))
            s = F32(hi - lo) / F32(2**bits - 1)
            s = _fp16(s if s > 0 else F32(1))
            z = min(max(np.rint(-lo / s), 0), 2**bits - 1)
            k = np.clip(np.rint(v / s) + z, 0, 2**bits - 1)
            out[r, sl] = (k - z) * s
            continue
        amax = F32(np.abs(v).max())
        div = F32(2 ** (bits - 1) - 1) if mode == "sym" else F32(2 ** (bits - 1) - 0.5)
        s = F32(amax / div)
        s = _fp16(s if s > 0 else F32(1))
        lo = -(2 ** (bits - 1) - 1) if mode == "sym" else -(2 ** (bits - 1))
        out[r, sl] = np.clip(np.rint(v / s), lo, 2 ** (bits - 1) - 1) * s
    return out


def ref_fp(x, e, m):
    x = np.asarray(x, dtype=F32)
    vmax = F32(nonneg_grid(e, m)[0][-1])
    s = F32(np.abs(x).max()) / vmax
    s = s if s > 0 else F32(1)
    return (round_minifloat(x / s, e, m).astype(F32) * s).astype(F32)


def _mx_exponent(amax: float, emax: int, vmax: float, ceil: bool | str) -> int:
    """``ceil``: True / "ceil" (_ru), "round" (_rn: one binade up iff 2 * mant >= 1.75)."""
    if amax == 0:
        return -127
    mant, exp = math.frexp(amax)  # amax = mant * 2**exp, mant in [0.5, 1)
    k = exp - 1 - emax  # floor(log2(amax)) - emax
    if ceil in (True, "ceil") and amax / 2.0**k > vmax:
        k += 1
    if ceil == "round" and 2 * mant >= 1.75:
        k += 1
    return max(-127, min(127, k))


def ref_mx(x, block, element, ceil=False):
    """``element``: ("fp", E, M) or ("int", bits)."""
    x = np.asarray(x, dtype=F32)
    out = np.empty_like(x)
    if element[0] == "fp":
        vals, codes = nonneg_grid(element[1], element[2])
        vmax = vals[-1]
    else:
        f = element[1] - 2
        vmax = (2 ** (element[1] - 1) - 1) / 2.0**f
    emax = math.frexp(vmax)[1] - 1
    for r, sl in _groups(x, block):
        v = x[r, sl].astype(np.float64)
        k = _mx_exponent(float(np.abs(v).max()), emax, vmax, ceil)
        y = v / 2.0**k
        if element[0] == "fp":
            q = round_grid(y, vals, codes)
        else:
            q = np.clip(np.rint(y * 2.0**f), -(2 ** (element[1] - 1) - 1), 2 ** (element[1] - 1) - 1)
            q = q / 2.0**f
        out[r, sl] = q * 2.0**k
    return out


def ref_nvfp4(x):
    x = np.asarray(x, dtype=F32)
    out = np.empty_like(x)
    ts = F32(np.abs(x).max()) / F32(6 * 448)
    ts = ts if ts > 0 else F32(1)
    for r, sl in _groups(x, 16):
        v = x[r, sl]
        bs = F32(round_minifloat(F32(F32(np.abs(v).max()) / F32(6)) / ts, 4, 3))
        d = F32(bs * ts)
        y = v / d if d > 0 else np.zeros_like(v)
        out[r, sl] = (round_minifloat(y, 2, 1).astype(F32) * bs).astype(F32) * ts
    return out


def ref_nf4(x, block=64):
    x = np.asarray(x, dtype=F32)
    out = np.empty_like(x)
    levels = np.array(NF4, dtype=F32).astype(np.float64)
    for r, sl in _groups(x, block):
        v = x[r, sl]
        amax = F32(np.abs(v).max())
        amax = amax if amax > 0 else F32(1)
        y = (v / amax).astype(np.float64)[:, None]
        d = np.abs(levels - y)
        idx = np.argmax(d == d.min(-1, keepdims=True), axis=-1)  # first = lower level on a tie
        out[r, sl] = levels[idx].astype(F32) * amax
    return out


def reference(name: str):
    """x (2-D float32, groups along the last axis) -> fake-quantized x, for a canonical name."""
    from ptqscale.formats import FixedPointSpec, get_format

    fmt = get_format(name)
    fam = fmt.family
    if fam == "baseline":
        return None
    if fam == "int":
        return lambda x: ref_int(x, fmt.bits, fmt.group, fmt.per_tensor, fmt.mode)
    if fam == "fp":
        return lambda x: ref_fp(x, fmt.spec.ebits, fmt.spec.mbits)
    if fam == "mx":
        el = fmt.element
        elem = ("int", el.bits) if isinstance(el, FixedPointSpec) else ("fp", el.ebits, el.mbits)
        return lambda x: ref_mx(x, fmt.block, elem, fmt.scale_rule)
    if fam == "nvfp4":
        return ref_nvfp4
    return lambda x: ref_nf4(x, fmt.block)


def code_points(fmt) -> torch.Tensor:
    """Every valid code of the format's elements (finite values only)."""
    from ptqscale.formats import FixedPointSpec, MinifloatSpec

    if fmt.family == "int":
        b = fmt.bits
        lo = {"asym": 0, "full": -(2 ** (b - 1)), "sym": 1 - 2 ** (b - 1)}[fmt.mode]
        return torch.arange(lo, 2**b if fmt.mode == "asym" else 2 ** (b - 1))
    if fmt.family == "nf4":
        return torch.arange(16)
    if fmt.family == "mx" and isinstance(fmt.element, FixedPointSpec):
        return torch.arange(-fmt.element.qmax, fmt.element.qmax + 1)
    spec = fmt.spec if fmt.family == "fp" else getattr(fmt, "element", MinifloatSpec(2, 1))
    table = minifloat_table(spec.ebits, spec.mbits)
    return torch.tensor([c for c in range(2**spec.bits) if math.isfinite(table[c])])
