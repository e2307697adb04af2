"""The format-name grammar (``FORMAT_GRAMMAR``, the one place it is written) and its parser.

Example:
    >>> get_format("int4_g128").describe()["bits_per_weight"]
    4.125
"""

from __future__ import annotations

import difflib
import functools
import re

from .base import Format
from .block import E2M1, OCP_MX_ELEMENTS, MXFormat, NF4Format, NVFP4Format
from .elements import FixedPointSpec, MinifloatSpec
from .scalar import BaselineFormat, FloatFormat, IntFormat

FORMAT_GRAMMAR = """\
Format names: lower case, fields joined by "_"; every format has exactly one spelling.

  bf16 | fp16                  16-bit baselines (a plain cast)
  int<b>[<gran>][<mode>]       integers, b in 2..8, one fp16 scale per group (nearest)
      <gran>  (none)  per-channel: one scale per slice along the axis
                      (= per output row of a Linear weight with axis=-1)
              _t      per-tensor
              _g<g>   per-group: g >= 2 consecutive elements along the axis
      <mode>  (none)  symmetric, restricted: codes +-(2^(b-1)-1), scale = amax/(2^(b-1)-1)
              _full   symmetric, full range: codes -2^(b-1)..2^(b-1)-1, scale = 2*amax/(2^b-1)
              _asym   asymmetric: codes 0..2^b-1, b-bit zero point, range [min(x,0), max(x,0)]
  fp<b>_e<E>m<M>               minifloat, one fp32 scale per tensor (tensor amax -> element max);
                               b = 1+E+M in 4..8, E in 2..6, M in 1..7; e4m3 = OCP E4M3 (max 448),
                               e5m2 = OCP E5M2 (IEEE-like, max 57344), any other eXmY has no
                               inf/NaN (e3m2 max 28, e2m3 max 7.5, e2m1 max 6)
  mxfp8_e4m3 | mxfp8_e5m2 | mxfp6_e3m2 | mxfp6_e2m3 | mxfp4 | mxint8
                               OCP Microscaling v1.0: block 32, one E8M0 scale per block,
                               2^(floor(log2(amax)) - emax_element)
  mxfp4_b<n> | mxfp<b>_e<E>m<M>_b<n> | mxint<b>_b<n>
                               generalized MX, block n >= 2 (written unless the format is one of
                               the OCP six with n = 32); mxint<b>: b in 2..8, b-2 fraction bits,
                               codes +-(2^(b-1)-1)
  <mx name>_ru                 MX with the round-up shared scale: smallest 2^k with amax/2^k <=
                               element max (nothing saturates), e.g. mxfp4_ru, mxint4_b32_ru
  <mx name>_rn                 MX with compressed-tensors' (llm-compressor's) shared scale: amax
                               rounded to one mantissa bit (halves up), then the OCP rule
  nvfp4                        NVIDIA NVFP4: E2M1, block 16, E4M3 block scale, fp32 tensor scale
  nf4 | nf4_b<n>               QLoRA NormalFloat-4, fp32 absmax per block of 64 (or n >= 2)

Blocks and groups run along axis=-1 (input features of a Linear weight) unless an axis is
given; an axis not divisible by the block is zero-padded (Encoded.pad says by how much).
"""

# Canonical examples: the close-match candidates of error messages (all must parse).
EXAMPLES: tuple[str, ...] = (
    "bf16", "fp16", "int8", "int8_t", "int8_asym", "int4_g128", "int4_g128_asym", "int4_g128_full",
    "int3_g128", "int3_g64_asym", "int2_g64", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3",
    "fp4_e2m1", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8",
    "mxfp4_ru", "mxfp4_rn", "mxint4_b32", "mxint4_b128", "mxint3_b128", "mxint6_b16", "mxint8_b64",
    "mxfp4_b64", "mxfp4_b16", "mxfp6_e2m3_b64", "nvfp4", "nf4", "nf4_b128",
)

_INT = re.compile(r"int(\d+)(?:_(t)|_g(\d+))?(?:_(asym|full))?")
_FP = re.compile(r"fp(\d+)_e(\d+)m(\d+)")
_MX = re.compile(r"mx(fp|int)(\d+)(?:_e(\d+)m(\d+))?(?:_b(\d+))?(_ru|_rn)?")
_NF4 = re.compile(r"nf4(?:_b(\d+))?")


class FormatError(ValueError):
    """A format name that is not in the grammar (the message lists the grammar and close names)."""


def _minifloat(bits: int, e: int, m: int) -> MinifloatSpec:
    if 1 + e + m != bits:
        raise ValueError(f"e{e}m{m} has 1+{e}+{m} = {1 + e + m} bits, not {bits}")
    return MinifloatSpec(e, m)


def _mx(kind, bits, e, m, block, ru) -> MXFormat:
    bits = int(bits)
    block = 32 if block is None else int(block)
    rule = {None: "floor", "_ru": "ceil", "_rn": "round"}[ru]
    if kind == "int":
        if e is not None:
            raise ValueError("mxint elements are fixed point and take no _e<E>m<M>")
        if not 2 <= bits <= 8:
            raise ValueError(f"mxint{bits}: element bits must be in 2..8")
        return MXFormat(FixedPointSpec(bits, bits - 2), block, rule)
    if e is None:
        if bits == 4:
            return MXFormat(E2M1, block, rule)
        ocp = [f"mxfp{bits}_{s.name}" for s in OCP_MX_ELEMENTS if s.bits == bits
               and isinstance(s, MinifloatSpec)]
        raise ValueError(f"mxfp{bits} needs its element type: "
                         + (" or ".join(ocp) if ocp else f"mxfp{bits}_e<E>m<M>_b<n>"))
    return MXFormat(_minifloat(bits, int(e), int(m)), block, rule)


def _build(name: str) -> Format:
    if name in ("bf16", "fp16"):
        return BaselineFormat(name)
    if name == "nvfp4":
        return NVFP4Format()
    if name.startswith("nvfp4"):
        raise ValueError("nvfp4 is fixed (E2M1, block 16, E4M3 + fp32 scales) and takes no options")
    if mt := _INT.fullmatch(name):
        bits, t, g, mode = mt.groups()
        return IntFormat(int(bits), None if g is None else int(g), t is not None, mode or "sym")
    if mt := _FP.fullmatch(name):
        return FloatFormat(_minifloat(*map(int, mt.groups())))
    if mt := _MX.fullmatch(name):
        return _mx(*mt.groups())
    if mt := _NF4.fullmatch(name):
        return NF4Format(64 if mt.group(1) is None else int(mt.group(1)))
    raise ValueError("no rule of the grammar matches")


def _fail(name, reason: str, canonical: str | None = None) -> FormatError:
    close = difflib.get_close_matches(str(name).lower(), EXAMPLES, n=4, cutoff=0.5)
    if canonical:
        close = [canonical] + [c for c in close if c != canonical]
    hint = f"closest valid names: {', '.join(close)}" if close else f"examples: {', '.join(EXAMPLES[:8])}"
    return FormatError(f"bad format name {name!r}: {reason}.\n{hint}\n\n{FORMAT_GRAMMAR}")


def get_format(name: str) -> Format:
    """The :class:`Format` named ``name`` (see ``FORMAT_GRAMMAR``); raises :class:`FormatError`.

    Example:
        >>> get_format("mxfp4").block_size, get_format("nvfp4").bits_per_weight
        (32, 4.5)
    """
    if not isinstance(name, str):
        raise _fail(name, f"expected a str, got {type(name).__name__}")
    return _parse(name)


@functools.cache
def _parse(name: str) -> Format:
    try:
        fmt = _build(name)
    except ValueError as err:
        raise _fail(name, str(err)) from None
    if fmt.name != name:
        raise _fail(name, f"not the canonical spelling; write it as {fmt.name!r}", fmt.name)
    return fmt
