"""Fused Triton fake-quantization for INT (per-channel / per-group) and MX formats on CUDA.

One kernel reads each element once and writes it once: a program loads a tile of whole scale
groups in the tensor's dtype, reduces each group's min / max, derives the scale exactly as the
torch reference (:mod:`.scalar`, :mod:`.block`) does and rounds. Every float32 operation is
the reference's, in the same order, with IEEE division (``div_rn``; Triton's ``/`` is
approximate) and round-half-even (``rint``), so the result is bitwise the reference's; the GPU
tests assert that for every supported format on random and edge-case tensors.

Two layouts, chosen per call:

- power-of-two groups up to 1024 (``int4_g128``, every MX block): a program takes
  ``BLOCK_R`` rows x ``CW`` columns and views them as ``(BLOCK_R * CW / g, g)`` groups;
- anything else (per-channel, odd group lengths): a program takes ``BLOCK_R`` rows of one
  group, in chunks of ``CHUNK`` columns; a group longer than one chunk is read twice (min/max
  pass, then rounding pass; the second read mostly hits L2).

A short last group (length not divisible by g) is masked: loaded zeros never change a scale
(absmax ignores them, the asymmetric range contains 0), exactly like the reference's own
handling. Non-finite elements follow the reference's policy (``base.finite_part``, here
``_finite``): they enter the min / max and the rounding as 0 and are stored back unchanged.
``fake_quantize_triton`` returns None for what it does not cover (the caller then uses the
torch reference).
"""

from __future__ import annotations

import contextlib
import functools

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Which element rule a kernel applies (constexpr selector).
INT_SYM, INT_ASYM, MX_INT, MX_FP = 0, 1, 2, 3
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def available() -> bool:
    return triton is not None


def spec(**rule) -> dict:
    """A kernel spec: the constexpr values of one element rule, unset ones at neutral values.

    ``KIND`` picks the rule: ``INT_SYM`` / ``INT_ASYM`` (fp16 scale ``amax / DIV`` resp.
    ``range / DIV``, codes clamped to ``[LO, HI]``, the scale rounded to fp16 as IntFormat
    stores it), ``MX_INT`` / ``MX_FP`` (E8M0 exponent ``floor(log2 amax) - EMAX``, one up
    when ``CEIL`` and the mantissa exceeds ``TOP``; fixed point with ``FRAC`` fraction bits
    saturating at ``HI``, or a minifloat with ``MBITS`` / ``EMIN`` saturating at ``HI``).
    """
    return dict(LO=0.0, HI=1.0, DIV=1.0, FRAC=0, MBITS=0, EMIN=0, EMAX=0, CEIL=False,
                TOP=1.0) | rule


def _defining(cls: type, attr: str) -> type:
    return next(c for c in cls.__mro__ if attr in c.__dict__)


@functools.cache
def kernel_spec(fmt) -> dict | None:
    """``fmt.kernel_spec()``, or None where the kernel must decline.

    A subclass that overrides the rounding rule (``_fit`` or ``_fake``) below the class that
    states the spec inherits a spec that no longer describes it: declined, so a new format
    can never reach the kernel inexactly (it takes the torch reference until it says what
    it is).
    """
    cls = type(fmt)
    owner = _defining(cls, "kernel_spec")
    if any(issubclass(_defining(cls, m), owner) and _defining(cls, m) is not owner
           for m in ("_fit", "_fake")):
        return None
    return fmt.kernel_spec()


def fake_quantize_triton(fmt, x: torch.Tensor, axis: int) -> torch.Tensor | None:
    """``fmt.fake_quantize(x, axis)`` by the fused kernel, or None where it does not apply."""
    if triton is None or x.dtype not in _DTYPES or kernel_spec(fmt) is None:
        return None
    if torch.compiler.is_compiling():  # inside torch.compile: the traceable reference
        return None
    if x.requires_grad and torch.is_grad_enabled():  # autograd: the reference's graph
        return None
    if not (x.is_cuda or _interpreting()):
        return None
    xm = x if axis == x.ndim - 1 else x.movedim(axis, -1)
    n = xm.shape[-1]
    x2 = xm.reshape(-1, n)  # a copy only when the axis was not already last and contiguous
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y2 = torch.empty_like(x2)
    # Triton launches on the current CUDA device: make it x's (a model spread over GPUs)
    with torch.cuda.device(x2.device) if x2.is_cuda else contextlib.nullcontext():
        _launch(x2, y2, fmt)
    y = y2.view(xm.shape)
    return y if axis == x.ndim - 1 else y.movedim(-1, axis)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1024)
def _plan(fmt, rows: int, n: int):
    """(kernel, grid, constexpr values in signature order) for a (rows, n) tensor."""
    g = min(fmt.scale_group_size(n) or n, n)
    if g & (g - 1) == 0 and g <= 1024:
        cw = max(g, min(1024, triton.next_power_of_2(n)))  # whole groups per tile
        block_r = max(1, 4096 // cw)
        kern, grid = _tiled_kernel, (triton.cdiv(rows, block_r), triton.cdiv(n, cw))
        consts = dict(G=g, CW=cw, BLOCK_R=block_r)
    else:
        chunk = min(triton.next_power_of_2(g), 4096)
        block_r = max(1, 2048 // chunk)
        kern, grid = _looped_kernel, (triton.cdiv(rows, block_r), triton.cdiv(n, g))
        consts = dict(G=g, CHUNK=chunk, BLOCK_R=block_r, N_CHUNKS=triton.cdiv(g, chunk))
    consts |= kernel_spec(fmt)
    return kern, grid, tuple(consts[a] for a in kern.arg_names[4:])


# Launchers of already-compiled kernels, keyed by everything their specialization saw. Calling
# the compiled kernel directly skips the JIT's per-call argument binding and cache lookup (tens
# of microseconds, as long as the kernel itself on a 4096x4096 tensor).
_RUNNERS: dict = {}


def _launch(x2: torch.Tensor, y2: torch.Tensor, fmt) -> None:
    rows, n = x2.shape
    kern, grid, consts = _plan(fmt, rows, n)
    key = (fmt, rows, n, x2.dtype, x2.device.index)
    aligned = x2.data_ptr() % 16 == 0 and y2.data_ptr() % 16 == 0
    runner = _RUNNERS.get(key) if aligned else None
    if runner is not None:
        runner(x2, y2, rows, n, *consts)
        return
    kwargs = dict(zip(kern.arg_names[4:], consts, strict=True))
    compiled = kern[grid](x2, y2, rows, n, **kwargs, num_warps=4 if "CW" in kwargs else 8)
    if aligned and hasattr(compiled, "__getitem__"):  # (the interpreter returns nothing)
        _RUNNERS[key] = compiled[grid + (1,) * (3 - len(grid))]


if triton is not None:

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
    def _rint(v):
        """Round half to even (torch.round): adding 2**23 leaves no fraction bits, and the fp32
        add rounds to nearest-even; the sign is put back so that -0.0 stays -0.0."""
        a = tl.abs(v)
        r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
        return _copysign(r, v)

    @triton.jit
    def _finite(x):
        """(x with NaN / +-inf as 0, mask of finite x): base.finite_part. NaN compares false."""
        ok = tl.abs(x) <= 3.4028234663852886e38
        return tl.where(ok, x, 0.0), ok

    @triton.jit
    def _to_fp16(s):
        """elements.round_float onto fp16 after the clamp: the hardware RNE cast is that."""
        s = tl.minimum(tl.maximum(s, 2.0**-24), 65504.0)
        return s.to(tl.float16).to(tl.float32)

    @triton.jit
    def _scale(mn, mx, KIND: tl.constexpr, DIV: tl.constexpr, HI: tl.constexpr,
               EMAX: tl.constexpr, CEIL: tl.constexpr, TOP: tl.constexpr):
        """(scale, zero) of groups with minimum ``mn`` and maximum ``mx`` (float32).

        INT: the fp16-rounded real scale (and the asymmetric zero point); MX: the int32 shared
        exponent k of the scale 2**k, carried in ``scale``'s place.
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
        e = _floor_log2(amax)
        k = e - EMAX
        if CEIL:  # one binade up iff amax's mantissa exceeds the element max's
            k = k + (_mul_pow2(amax, -e) > TOP).to(tl.int32)
        k = tl.minimum(tl.maximum(k, -127), 127)
        return k.to(tl.float32), tl.zeros_like(amax)

    @triton.jit
    def _round(x, s, z, KIND: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
               FRAC: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr):
        """Grid values of float32 ``x`` given its group's (scale, zero) from ``_scale``; NaN
        and +-inf come back unchanged (the formats' non-finite policy; GPTQ's kernel too)."""
        xz, ok = _finite(x)
        return tl.where(ok, _round_finite(xz, s, z, KIND, LO, HI, FRAC, MBITS, EMIN), x)

    @triton.jit
    def _round_finite(x, s, z, KIND: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
                      FRAC: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr):
        if KIND == 0:
            q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, s)), LO), HI)
            return q * s
        if KIND == 1:
            q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, s)) + z, LO), HI)
            return (q - z) * s
        k = s.to(tl.int32)
        y = _mul_pow2(x, -k)  # exact: power-of-two scale
        if KIND == 2:
            q = tl.minimum(tl.maximum(_rint(y * (2.0**FRAC)), -HI), HI)
            return _mul_pow2(q, k - FRAC)
        a = tl.minimum(tl.abs(y), HI)  # saturate, then round in a's binade (elements.round_float)
        step = tl.maximum(_floor_log2(a), EMIN) - MBITS
        q = _rint(a * _pow2(-step)) * _pow2(step)
        return _mul_pow2(_copysign(q, y), k)

    @triton.jit
    def _tiled_kernel(x_ptr, y_ptr, rows, n, G: tl.constexpr, CW: tl.constexpr,
                      BLOCK_R: tl.constexpr, KIND: tl.constexpr, LO: tl.constexpr,
                      HI: tl.constexpr, DIV: tl.constexpr, FRAC: tl.constexpr,
                      MBITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                      CEIL: tl.constexpr, TOP: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * CW + tl.arange(0, CW)
        offs = r[:, None].to(tl.int64) * n + c[None, :]
        mask = (r[:, None] < rows) & (c[None, :] < n)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xg = tl.reshape(x, (BLOCK_R * CW // G, G))
        xz = _finite(xg)[0]  # a NaN / inf fits as 0
        mn = tl.min(xz, axis=1)[:, None]
        mx = tl.max(xz, axis=1)[:, None]
        s, z = _scale(mn, mx, KIND, DIV, HI, EMAX, CEIL, TOP)
        y = _round(xg, s, z, KIND, LO, HI, FRAC, MBITS, EMIN)
        y = tl.reshape(y, (BLOCK_R, CW))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    @triton.jit
    def _looped_kernel(x_ptr, y_ptr, rows, n, G: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK_R: tl.constexpr, N_CHUNKS: tl.constexpr, KIND: tl.constexpr,
                       LO: tl.constexpr, HI: tl.constexpr, DIV: tl.constexpr,
                       FRAC: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
                       EMAX: tl.constexpr, CEIL: tl.constexpr, TOP: tl.constexpr):
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
            x = _finite(x)[0]  # a NaN / inf fits as 0
            mn = tl.minimum(mn, tl.min(x, axis=1)[:, None])
            mx = tl.maximum(mx, tl.max(x, axis=1)[:, None])
        s, z = _scale(mn, mx, KIND, DIV, HI, EMAX, CEIL, TOP)
        for i in tl.static_range(N_CHUNKS):
            c = g0 + i * CHUNK + tl.arange(0, CHUNK)
            mask = row_ok & (c[None, :] < n) & (c[None, :] < g0 + G)
            x = tl.load(x_ptr + base + c[None, :], mask=mask, other=0.0).to(tl.float32)
            y = _round(x, s, z, KIND, LO, HI, FRAC, MBITS, EMIN)
            tl.store(y_ptr + base + c[None, :], y.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
