"""The Triton code of the fused fake-quantize kernels (the launch logic is in :mod:`.kernels`).

Every float32 operation is the torch reference's (:mod:`.scalar`, :mod:`.block`), in the same
order, with correctly rounded division (``div_rn``, or ``_div``'s reciprocal and correction
where a group shares the divisor; Triton's ``/`` is approximate) and round-half-even
(``_rint``), so that results are bitwise the reference's. Imported only where Triton is.

Non-finite values (docs/formats.md, "Non-finite values"): ``_finite`` is the twin of
``base.finite_part``. Every reduction (a group's min / max, pass 1's absmax) reads a NaN or
+-inf as 0, and ``_round`` returns it unchanged, so the output keeps it in place and no other
element moves: the reference's ``where(finite, y, x)``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Which element rule a kernel applies (constexpr selector), mirrored by kernels.py.
INT_SYM, INT_ASYM, MX_INT, MX_FP, FP, NVFP4, NF4 = range(7)


@triton.jit
def _pow2(n):
    """2**n as float32 for int32 n in [-126, 127] (elements.pow2)."""
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mul_pow2(x, n):
    """x * 2**n for n in [-252, 254] in two exact steps (elements.mul_pow2)."""
    half = tl.where(n >= 0, n // 2, -((1 - n) // 2))  # floor division for negatives
    return x * _pow2(half) * _pow2(n - half)


@triton.jit
def _floor_log2(a):
    return (a.to(tl.int32, bitcast=True) >> 23) - 127


@triton.jit
def _copysign(q, y):
    sign = y.to(tl.uint32, bitcast=True) & 0x80000000
    return (q.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _rint_arith(v):
    """Round half to even (torch.round): adding 2**23 leaves no fraction bits, and the fp32
    add rounds to nearest-even; the sign is put back so that -0.0 stays -0.0."""
    a = tl.abs(v)
    r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
    return _copysign(r, v)


@triton.jit
def _rint_cvt(v):
    """Round half to even in one instruction (``cvt.rni``; -0.0 and the sign of a result that
    rounds to zero are kept, as IEEE roundToIntegralTiesToEven does). Inline PTX rather than
    libdevice's ``rint``: the same instruction, but with libdevice ptxas spilled a register in
    the MX kernels (tests/formats/kernels_compile_check.py)."""
    return tl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                     is_pure=True, pack=1)


# Triton's interpreter (on the CPU) is chosen when the kernels are decorated, i.e. at import.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# The GPU takes the one-instruction rint (seven fewer float operations per element; the
# rounding kernels are compute-bound at HBM3e rates); Triton's interpreter cannot run PTX,
# so there the arithmetic twin runs. Both are bitwise torch.round: the GPU tests check the first,
# the interpreter tests the second.
_rint = _rint_arith if INTERPRETING else _rint_cvt


@triton.jit
def _div(x, d, WIDE: tl.constexpr):
    """``div_rn(x, d)`` for a divisor shared by a group (``d`` broadcast over ``x``), bitwise.

    The reciprocal is rounded once per group (an operation on ``d``'s shape); each element
    then costs a multiply and two FMAs, Markstein's correction: with y = RN(1/d) and
    q = RN(x y), the residual x - d q is exact and RN(q + (x - d q) y) is RN(x / d), as long
    as nothing underflows or overflows. IEEE division costs several times that per element.
    ``WIDE``: d may be anywhere in float32's range (per-tensor and block absmax rules); an
    exact power of two then moves it into [2**-60, 2**60] (and x with it), where the
    reciprocal and every residual that can move a rounding are normal numbers. INT scales are
    fp16 values in [2**-24, 65504] and need no move. A quotient that overflows (only if x is
    beyond 2**100 times its group's scale) is returned as the infinite RN(x y), like div_rn's,
    and a zero one as RN(x y), signed like x.
    """
    if WIDE:
        f = tl.where(d < 2.0**-60, 2.0**100, tl.where(d > 2.0**60, 2.0**-64, 1.0))
        x = x * f
        d = d * f
    y = tl.math.div_rn(1.0, d)
    q = x * y
    q1 = tl.math.fma(tl.math.fma(-q, d, x), y, q)
    # a zero quotient keeps x's sign (the correction would add +0 to -0), an overflow stays inf
    return tl.where((q != 0) & (tl.abs(q) <= 3.4028234663852886e38), q1, q)


@triton.jit
def _finite(x):
    """(x with NaN / +-inf as 0, mask of finite x): base.finite_part / finite_mask. A NaN
    compares false, so it is not ``ok``."""
    ok = tl.abs(x) <= 3.4028234663852886e38
    return tl.where(ok, x, 0.0), ok


@triton.jit
def _to_fp16(s):
    """elements.round_float onto fp16 after the clamp: the hardware RNE cast is that."""
    s = tl.minimum(tl.maximum(s, 2.0**-24), 65504.0)
    return s.to(tl.float16).to(tl.float32)


@triton.jit
def _round_minifloat(y, MBITS: tl.constexpr, EMIN: tl.constexpr, HI: tl.constexpr):
    """elements.round_float (saturating): nearest-even on the grid of y's binade, sign kept."""
    a = tl.minimum(tl.abs(y), HI)
    step = tl.maximum(_floor_log2(a), EMIN) - MBITS
    return _copysign(_rint(a * _pow2(-step)) * _pow2(step), y)


@triton.jit
def _scale(mn, mx, ta, KIND: tl.constexpr, DIV: tl.constexpr, HI: tl.constexpr,
           EMAX: tl.constexpr, CEIL: tl.constexpr, TOP: tl.constexpr):
    """(scale, zero) of groups with minimum ``mn`` and maximum ``mx`` (float32); ``ta`` is the
    whole tensor's absmax (read only by the per-tensor rules).

    INT: the fp16-rounded real scale (and the asymmetric zero point); MX: the int32 shared
    exponent k of the scale 2**k, carried in ``scale``'s place; FP: amax / element max;
    NVFP4: the E4M3 block scale and the float32 tensor scale (in ``zero``'s place); NF4: the
    block absmax.
    """
    if KIND == 1:  # INT asym: range [min(x, 0), max(x, 0)]
        lo = tl.minimum(mn, 0.0)
        s = tl.math.div_rn(tl.maximum(mx, 0.0) - lo, DIV)
        s = _to_fp16(tl.where(s > 0, s, 1.0))
        z = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, s)), 0.0), HI)
        return s, z
    amax = tl.maximum(mx, -mn)
    if KIND == 0:
        s = tl.math.div_rn(amax, DIV)
        return _to_fp16(tl.where(s > 0, s, 1.0)), tl.zeros_like(s)
    if KIND == 4:  # scalar.FloatFormat: _guard(amax / element max)
        s = tl.math.div_rn(amax, HI)
        return tl.where(s > 0, s, 1.0), tl.zeros_like(s)
    if KIND == 5:  # block.NVFP4Format._fit: ts = ta / (6 * 448); E4M3((amax / 6) / ts)
        ts = tl.math.div_rn(ta, DIV)
        ts = tl.where(ts > 0, ts, 1.0)
        # abs: max(0, -0) may be -0, and a -0 block scale would sign the zeros of its block
        bs = tl.math.div_rn(tl.math.div_rn(tl.abs(amax), HI), ts)
        return _round_minifloat(bs, 3, -6, 448.0), ts + tl.zeros_like(bs)
    if KIND == 6:  # block.NF4Format._fit
        return tl.where(amax > 0, amax, 1.0), tl.zeros_like(amax)
    e = _floor_log2(amax)
    k = e - EMAX
    if CEIL:  # one binade up iff amax's mantissa exceeds the element max's
        k = k + (_mul_pow2(amax, -e) > TOP).to(tl.int32)
    k = tl.minimum(tl.maximum(k, -127), 127)
    return k.to(tl.float32), tl.zeros_like(amax)


@triton.jit
def _nf4(y, tab_ptr):
    """NF4 level of y (elements.round_nf4 + nf4_values): the level index is the number of
    thresholds <= y. ``tab_ptr`` (kernels.nf4_table): the 16 levels, then for each of 32
    buckets of width 1/16 over [-1, 1) the threshold inside it (+inf where none) and the count
    of thresholds below it. Three table reads instead of fifteen compare-and-selects; a y
    misplaced into a neighbouring bucket by rounding still gets its index, because no
    threshold lies within 1e-3 of a bucket edge (kernels.nf4_table checks)."""
    b = tl.minimum(tl.maximum((y + 1.0) * 16.0, 0.0), 31.0).to(tl.int32)  # trunc = floor here
    idx = tl.load(tab_ptr + 48 + b).to(tl.int32) + (y >= tl.load(tab_ptr + 16 + b)).to(tl.int32)
    return tl.load(tab_ptr + idx)


@triton.jit
def _round(x, s, z, tab_ptr, KIND: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
           FRAC: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """Grid values of float32 ``x`` given its group's (scale, zero) from ``_scale``; NaN and
    +-inf come back unchanged (the formats' non-finite policy; GPTQ's fused loop too)."""
    xz, ok = _finite(x)
    return tl.where(ok, _round_finite(xz, s, z, tab_ptr, KIND, LO, HI, FRAC, MBITS, EMIN), x)


@triton.jit
def _round_finite(x, s, z, tab_ptr, KIND: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
                  FRAC: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """``_round`` of a finite ``x``."""
    if KIND == 0:
        q = tl.minimum(tl.maximum(_rint(_div(x, s, False)), LO), HI)
        return q * s
    if KIND == 1:
        q = tl.minimum(tl.maximum(_rint(_div(x, s, False)) + z, LO), HI)
        return (q - z) * s
    if KIND == 4:
        return _round_minifloat(_div(x, s, True), MBITS, EMIN, HI) * s
    if KIND == 5:  # z is the tensor scale; a zero block scale gives zeros
        d = s * z
        y = tl.where(d > 0, _div(x, d, True), 0.0)
        return _round_minifloat(y, MBITS, EMIN, HI) * s * z
    if KIND == 6:
        return _nf4(_div(x, s, True), tab_ptr) * s
    k = s.to(tl.int32)
    y = _mul_pow2(x, -k)  # exact: power-of-two scale
    if KIND == 2:
        q = tl.minimum(tl.maximum(_rint(y * (2.0**FRAC)), -HI), HI)
        return _mul_pow2(q, k - FRAC)
    return _mul_pow2(_round_minifloat(y, MBITS, EMIN, HI), k)


@triton.jit
def amax_kernel(x_ptr, part_ptr, numel, iters, BLOCK: tl.constexpr):
    """Pass 1 of the per-tensor rules: program p writes the absmax of blocks p, p + P, ...

    Strided so that the programs running at a time read neighbouring memory, and the last
    blocks read are the tensor's end, where pass 2 (in reverse order) starts: L2 still has them.
    """
    p = tl.program_id(0)
    step = tl.num_programs(0)
    m = tl.zeros((BLOCK,), tl.float32)
    for i in range(iters):
        offs = (i * step + p).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
        m = tl.maximum(m, tl.abs(_finite(x)[0]))  # the absmax of the finite values
    tl.store(part_ptr + p, tl.max(m, axis=0))


@triton.jit
def tiled_kernel(x_ptr, y_ptr, part_ptr, tab_ptr, rows, n, n_parts, G: tl.constexpr,
                 CW: tl.constexpr, BLOCK_R: tl.constexpr, TENSOR: tl.constexpr,
                 PARTS: tl.constexpr, KIND: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
                 DIV: tl.constexpr, FRAC: tl.constexpr, MBITS: tl.constexpr,
                 EMIN: tl.constexpr, EMAX: tl.constexpr, CEIL: tl.constexpr,
                 TOP: tl.constexpr):
    """A BLOCK_R x CW tile of whole groups of G (a power of two); 1-D grid in memory order.

    TENSOR: the rule needs the tensor's absmax, reduced from pass 1's ``n_parts`` partial maxima
    (a few hundred floats, L2-resident); the tiles then run from the tensor's end backwards.
    """
    pid = tl.program_id(0)
    if TENSOR:
        pid = tl.num_programs(0) - 1 - pid
    n_cb = tl.cdiv(n, CW)
    r = (pid // n_cb) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = (pid % n_cb) * CW + tl.arange(0, CW)
    offs = r[:, None].to(tl.int64) * n + c[None, :]
    mask = (r[:, None] < rows) & (c[None, :] < n)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ta = 0.0
    if TENSOR:
        j = tl.arange(0, PARTS)
        ta = tl.max(tl.load(part_ptr + j, mask=j < n_parts, other=0.0), axis=0)
    if TENSOR and KIND != 5:  # one scale for everything
        s, z = _scale(-ta, ta, ta, KIND, DIV, HI, EMAX, CEIL, TOP)
        y = _round(x, s, z, tab_ptr, KIND, LO, HI, FRAC, MBITS, EMIN)
    else:
        xg = tl.reshape(x, (BLOCK_R * CW // G, G))
        xz = _finite(xg)[0]  # a NaN / inf fits as 0
        mn = tl.min(xz, axis=1)[:, None]
        mx = tl.max(xz, axis=1)[:, None]
        s, z = _scale(mn, mx, ta, KIND, DIV, HI, EMAX, CEIL, TOP)
        y = tl.reshape(_round(xg, s, z, tab_ptr, KIND, LO, HI, FRAC, MBITS, EMIN), (BLOCK_R, CW))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def looped_kernel(x_ptr, y_ptr, part_ptr, tab_ptr, rows, n, n_parts, G: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, N_CHUNKS: tl.constexpr,
                  KIND: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, DIV: tl.constexpr,
                  FRAC: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                  EMAX: tl.constexpr, CEIL: tl.constexpr, TOP: tl.constexpr):
    """BLOCK_R rows of one group of any length G, in chunks of CHUNK columns: min/max pass,
    then rounding pass (a group of one chunk is read once; longer ones twice, mostly from L2)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g0 = tl.program_id(1) * G
    row_ok = r[:, None] < rows
    base = r[:, None].to(tl.int64) * n
    mn = tl.zeros((BLOCK_R, 1), tl.float32)  # zeros: as the reference's padding would
    mx = tl.zeros((BLOCK_R, 1), tl.float32)
    for i in tl.static_range(N_CHUNKS):
        c = g0 + i * CHUNK + tl.arange(0, CHUNK)
        mask = row_ok & (c[None, :] < n) & (c[None, :] < g0 + G)
        x = tl.load(x_ptr + base + c[None, :], mask=mask, other=0.0).to(tl.float32)
        xz = _finite(x)[0]  # a NaN / inf fits as 0 (x itself is rounded below: kept as it is)
        mn = tl.minimum(mn, tl.min(xz, axis=1)[:, None])
        mx = tl.maximum(mx, tl.max(xz, axis=1)[:, None])
    s, z = _scale(mn, mx, 0.0, KIND, DIV, HI, EMAX, CEIL, TOP)
    for i in tl.static_range(N_CHUNKS):
        c = g0 + i * CHUNK + tl.arange(0, CHUNK)
        mask = row_ok & (c[None, :] < n) & (c[None, :] < g0 + G)
        if N_CHUNKS > 1:
            x = tl.load(x_ptr + base + c[None, :], mask=mask, other=0.0).to(tl.float32)
        y = _round(x, s, z, tab_ptr, KIND, LO, HI, FRAC, MBITS, EMIN)
        tl.store(y_ptr + base + c[None, :],
                 y.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
