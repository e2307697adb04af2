"""Fused Triton fake-quantization on CUDA: INT, MX, per-tensor FP / INT, NVFP4 and NF4.

One kernel reads each element once and writes it once: a program loads a tile of whole scale
groups in the tensor's dtype, reduces each group's min / max, derives the scale exactly as the
torch reference (:mod:`.scalar`, :mod:`.block`) does and rounds (the Triton code is
:mod:`.kernels_jit`). Every float32 operation gives the reference's result (the same
operations in the same order; a division by a group's scale as a per-group reciprocal and an
exact correction), so the result is bitwise the reference's;
tests/formats/test_formats_kernels.py asserts that for every supported format, on the GPU and
on the CPU under ``TRITON_INTERPRET=1``.

Layouts, chosen per call:

- power-of-two groups up to 16384 (``int4_g128``, every MX block, NVFP4's 16, NF4's 64,
  per-channel rows up to 16384 columns, padded to a power of two by masking): a program takes
  ``BLOCK_R`` rows x ``CW`` columns and views them as ``(BLOCK_R * CW / g, g)`` groups (a row
  longer than 8192 is one program of 16 or 32 warps);
- anything else (odd group lengths, rows over 16384), and as a rival candidate for groups over
  8192: a program takes ``BLOCK_R`` rows of one group, in chunks of ``CHUNK`` columns (a group
  longer than a chunk is read twice);
- rules with a per-tensor scale (``fp8_e4m3``, ``int8_t``, NVFP4's second level) take two
  passes: a read-only absmax reduction into a few hundred partial maxima, then the tiled kernel
  in reverse memory order, so its first tiles are the ones pass 1 left in L2. Reading the
  tensor twice bounds them at 2/3 of copy bandwidth where the tensor does not fit in L2.

Tile shapes and warps do not change any value (each group's arithmetic is the same); the
first call for a (format, shape, dtype, device) of at least ``_TUNE_MIN`` elements times a few
candidates and keeps the fastest (``_candidates``; smaller tensors and calls during CUDA graph
capture take the first).

A short last group (length not divisible by g) is masked: loaded zeros never change a scale
(absmax ignores them, the asymmetric range contains 0), exactly like the reference's own
handling. Non-finite elements follow the reference's policy (``base.finite_part``; in the
kernels ``kernels_jit._finite``): they enter every min / max, the pass-1 absmax and the rounding
as 0 and are stored back unchanged, so NaN / +-inf inputs are bitwise the reference's too.
``fake_quantize_triton`` returns None for what it does not cover (the caller then uses the
torch reference).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the torch reference
    import triton

    from . import kernels_jit as jit
except ImportError:  # pragma: no cover - depends on the install
    triton = jit = None

# Which element rule a kernel applies (constexpr selector; kernels_jit's values).
INT_SYM, INT_ASYM, MX_INT, MX_FP, FP, NVFP4, NF4 = range(7)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_AMAX_BLOCK = 8192  # elements per pass-1 load (two programs per SM keep ~32 KB in flight)
_TILE_MAX = 16384  # the longest group a tile holds whole (in 16 or 32 warps' registers)
_TUNE_MIN = 1 << 20  # smaller tensors take the first candidate: not worth compiling the others


def available() -> bool:
    return triton is not None


def spec(**rule) -> dict:
    """A kernel spec: the constexpr values of one element rule, unset ones at neutral values.

    ``KIND`` picks the rule: ``INT_SYM`` / ``INT_ASYM`` (fp16 scale ``amax / DIV`` resp.
    ``range / DIV``, codes clamped to ``[LO, HI]``, the scale rounded to fp16 as IntFormat
    stores it), ``MX_INT`` / ``MX_FP`` (E8M0 exponent ``floor(log2 amax) - EMAX``, one up
    when ``CEIL`` and the mantissa exceeds ``TOP``; fixed point with ``FRAC`` fraction bits
    saturating at ``HI``, or a minifloat with ``MBITS`` / ``EMIN`` saturating at ``HI``),
    ``FP`` (float32 scale ``amax / HI``, a minifloat with ``MBITS`` / ``EMIN``), ``NVFP4``
    (tensor scale ``tensor amax / DIV``, an E4M3 block scale of ``(amax / HI) / tensor scale``,
    the minifloat ``MBITS`` / ``EMIN`` / ``HI``), ``NF4`` (block absmax, nearest NF4 level).
    ``TENSOR``: the amax is the whole tensor's (NVFP4: needed besides the block's).
    """
    return dict(LO=0.0, HI=1.0, DIV=1.0, FRAC=0, MBITS=0, EMIN=0, EMAX=0, CEIL=False,
                TOP=1.0, TENSOR=False) | rule


def _defining(cls: type, attr: str) -> type | None:
    return next((c for c in cls.__mro__ if attr in c.__dict__), None)


@functools.cache
def kernel_spec(fmt) -> dict | None:
    """``fmt.kernel_spec()``, or None where the kernel must decline.

    A subclass that overrides the rounding rule (``_fit`` or ``_fake``) below the class that
    states the spec inherits a spec that no longer describes it: declined, so a new format
    can never reach the kernel inexactly (it takes the torch reference until it says what
    it is). So does an object that only forwards to a format (blockft's RecordingFormat
    must see every ``fit``, which the kernel would bypass).
    """
    cls = type(fmt)
    owner = _defining(cls, "kernel_spec")
    if owner is None or any(issubclass(_defining(cls, m), owner) and _defining(cls, m) is not owner
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
    if not (x.is_cuda or jit.INTERPRETING):
        return None
    xm = x if axis == x.ndim - 1 else x.movedim(axis, -1)
    # (rows, n): a copy only when the axis was not already last and contiguous (a weight, 2-D
    # and contiguous, goes as it is: host time per call matters as much as the kernel's on 4096^2)
    x2 = xm if xm.ndim == 2 else xm.reshape(-1, xm.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    # The interpreter's float32 -> bfloat16 store does not round to nearest-even (Triton 3.9):
    # under it the kernel writes float32 and torch casts (the GPU kernel casts in the store).
    cast = x2.dtype != torch.float32 and not x2.is_cuda
    y2 = torch.empty_like(x2, dtype=torch.float32 if cast else x2.dtype)
    # Triton launches on the current CUDA device: make it x's (a model spread over GPUs)
    other = x2.is_cuda and x2.device.index != torch.cuda.current_device()
    with torch.cuda.device(x2.device) if other else contextlib.nullcontext():
        _launch(x2, y2, fmt)
    y = y2.to(x2.dtype) if cast else y2
    y = y if xm.ndim == 2 else y.view(xm.shape)
    return y if axis == x.ndim - 1 else y.movedim(-1, axis)


@functools.lru_cache(maxsize=16)
def _n_sms(index: int | None) -> int:
    if index is None:  # the interpreter
        return 2
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=1024)
def _candidates(fmt, rows: int, n: int, sms: int) -> tuple:
    """Launch configurations (kernel, grid, constexprs in signature order, warps, pass-1 programs)
    of a (rows, n) tensor: all give the same values, they differ only in speed."""
    rule = kernel_spec(fmt)
    group = min(fmt.scale_group_size(n) or n, n)
    g = group
    if g == n and triton.next_power_of_2(n) <= _TILE_MAX:  # one group per row (per-channel)
        g = triton.next_power_of_2(n)  # its masked tail loads zeros, which change no scale
    parts = 0
    if rule["TENSOR"]:  # pass 1: two programs per SM, each striding over the tensor
        parts = min(triton.cdiv(rows * n, _AMAX_BLOCK), 2 * sms)
    out = []
    if rule["TENSOR"] or (g & (g - 1) == 0 and g <= _TILE_MAX):
        cw = min(1024, triton.next_power_of_2(n))
        cw = cw if rule["TENSOR"] and rule["KIND"] != NVFP4 else max(g, cw)  # whole groups
        g = cw if rule["TENSOR"] and rule["KIND"] != NVFP4 else g
        # (tile elements, warps); the first, taken untuned, holds 16 floats a thread: at 32,
        # Triton 3.7's ptxas spills a register in mxfp4's kernel. A tile of more than 8192 is
        # one long row held in the registers of 16 or 32 warps (a row of 32768 would spill).
        shapes = ((2048, 4), (4096, 4), (4096, 8), (8192, 8)) if cw <= 8192 else \
            ((cw, 16), (cw, 32))
        seen = set()
        for tile, warps in shapes:
            block_r = max(1, tile // cw)
            if (block_r, warps) in seen:
                continue
            seen.add((block_r, warps))
            grid = (triton.cdiv(rows, block_r) * triton.cdiv(n, cw),)
            consts = dict(G=g, CW=cw, BLOCK_R=block_r, PARTS=triton.next_power_of_2(max(parts, 1)))
            out.append((jit.tiled_kernel, grid, consts | rule, warps, parts))
    if not out or (group > 8192 and not rule["TENSOR"]):  # odd groups; for long rows, a rival
        g = group
        chunk = min(triton.next_power_of_2(g), 4096)
        seen = set()
        for elems, warps in ((2048, 8), (4096, 8), (1024, 4)):
            block_r = max(1, elems // chunk)
            if (block_r, warps) in seen:
                continue
            seen.add((block_r, warps))
            grid = (triton.cdiv(rows, block_r), triton.cdiv(n, g))
            consts = dict(G=g, CHUNK=chunk, BLOCK_R=block_r, N_CHUNKS=triton.cdiv(g, chunk))
            out.append((jit.looped_kernel, grid, consts | rule, warps, parts))
    return tuple((k, grid, tuple(c[a] for a in k.arg_names[7:] if a in c), w, p)
                 for k, grid, c, w, p in out)


@functools.lru_cache(maxsize=16)
def nf4_table(device: torch.device) -> torch.Tensor:
    """The kernels' NF4 lookup (``kernels_jit._nf4``), float32 on ``device``: the 16 levels;
    for each of 32 buckets of width 1/16 over [-1, 1), the threshold inside it (+inf where
    none); and the number of thresholds below each bucket."""
    from .elements import _NF4_THRESHOLDS, NF4_LEVELS

    t = torch.tensor(_NF4_THRESHOLDS, dtype=torch.float64)
    edges = torch.arange(33, dtype=torch.float64) / 16 - 1
    # A rounded bucket index may be one off for y within ~1e-7 of an edge: harmless only if
    # no threshold is that close to one (the nearest is 1.7e-3 away).
    assert (t[:, None] - edges[None, :]).abs().min() > 1e-3
    bucket = ((t + 1) * 16).floor().long()
    assert bucket.bincount(minlength=32).max() <= 1  # thresholds are > 1/16 apart
    inside = torch.full((32,), math.inf, dtype=torch.float64)
    inside[bucket] = t
    below = (t[None, :] < edges[:32, None]).sum(1).double()
    table = torch.cat([torch.tensor(NF4_LEVELS, dtype=torch.float64), inside, below])
    return table.to(torch.float32).to(device)


# Launchers of already-compiled kernels, keyed by everything their specialization saw. Calling
# the compiled kernel directly skips the JIT's per-call argument binding and cache lookup (tens
# of microseconds, as long as the kernel itself on a 4096x4096 tensor). CHOSEN: the tuned
# candidate of each key, as (kernel name, grid, constexprs, warps) for benchmark records.
_RUNNERS: dict = {}
CHOSEN: dict = {}


def _launch(x2: torch.Tensor, y2: torch.Tensor, fmt, choice: int | None = None) -> None:
    """Run the kernel for ``fmt`` on (rows, n) ``x2`` into ``y2``; ``choice`` forces one of
    ``_candidates`` (tests), else the fastest one is found on the first call (CUDA)."""
    rows, n = x2.shape
    key = (fmt, rows, n, x2.dtype, x2.device.index)
    aligned = x2.data_ptr() % 16 == 0 and y2.data_ptr() % 16 == 0
    runner = _RUNNERS.get(key) if aligned and choice is None else None
    if runner is not None:
        runner(x2, y2)
        return
    cands = _candidates(fmt, rows, n, _n_sms(x2.device.index if x2.is_cuda else None))
    if (choice is not None or not aligned or not x2.is_cuda
            or torch.cuda.is_current_stream_capturing()):
        _run(cands[choice or 0], x2, y2)
        return
    if rows * n < _TUNE_MIN:  # the first candidate, kept
        _RUNNERS[key] = _run(cands[0], x2, y2)
        return
    runners = [_run(c, x2, y2) for c in cands]  # compiles each (and runs it once)
    times = [_time(lambda r=r: r(x2, y2)) for r in runners]
    best = min(range(len(cands)), key=times.__getitem__)
    kern, grid, consts, warps, _ = cands[best]
    names = [a for a in kern.arg_names[7:]]
    CHOSEN[key] = (kern.__name__, grid, dict(zip(names, consts, strict=True)), warps)
    _RUNNERS[key] = runners[best]
    runners[best](x2, y2)  # the result (every candidate's is the same)


def _run(cand, x2, y2):
    """Launch one candidate (pass 1 first where the rule needs the tensor's absmax); returns
    a ``runner(x2, y2)`` that repeats it through the compiled kernels (None: interpreter)."""
    kern, grid, consts, warps, parts = cand
    rows, n = x2.shape
    nf4 = dict(zip(kern.arg_names[7:], consts, strict=True))["KIND"] == NF4
    table = nf4_table(x2.device) if nf4 else None
    tab = x2 if table is None else table  # (other rules never read it)
    part, amax, iters = x2, None, 0
    if parts:
        part = torch.empty(parts, dtype=torch.float32, device=x2.device)
        iters = triton.cdiv(triton.cdiv(rows * n, _AMAX_BLOCK), parts)
        amax = jit.amax_kernel[(parts,)](x2, part, rows * n, iters, BLOCK=_AMAX_BLOCK, num_warps=8)
    kwargs = dict(zip(kern.arg_names[7:], consts, strict=True))
    main = kern[grid](x2, y2, part, tab, rows, n, parts, **kwargs, num_warps=warps)
    if not hasattr(main, "__getitem__"):  # the interpreter returns nothing
        return None
    launch_main = main[grid + (1,) * (3 - len(grid))]
    if not parts:
        return lambda x, y: launch_main(x, y, x, x if table is None else table, rows, n, parts,
                                        *consts)
    launch_amax = amax[(parts, 1, 1)]

    def runner(x, y):
        p = torch.empty(parts, dtype=torch.float32, device=x.device)
        launch_amax(x, p, rows * n, iters, _AMAX_BLOCK)
        launch_main(x, y, p, x, rows, n, parts, *consts)

    return runner


def _time(fn, reps: int = 10) -> float:
    """GPU milliseconds of ``reps`` back-to-back calls of ``fn`` (compiled already). A sleep
    kernel first holds the stream while the host queues the calls, so that the host's launch
    cost (as long as a small kernel) does not hide the differences between candidates."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1 << 21)  # ~1 ms
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)
