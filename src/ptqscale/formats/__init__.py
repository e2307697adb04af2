"""Number formats: the "data type" axis of every ptqscale study (pure torch; imports nothing
else of ptqscale).

A format is an immutable value object parsed from a short name::

    >>> from ptqscale.formats import get_format, sqnr_db
    >>> fmt = get_format("mxint4_b128")
    >>> fmt.name, fmt.family, fmt.element_bits, fmt.block_size, fmt.bits_per_weight
    ('mxint4_b128', 'mx', 4, 128, 4.0625)
    >>> w = torch.randn(16, 256)
    >>> q = fmt.fake_quantize(w)                  # same shape and dtype, fp32 internals
    >>> enc = fmt.encode(w); torch.equal(fmt.decode(enc), q)
    True

API of a :class:`Format`: ``name``, ``family`` (baseline | int | fp | mx | nvfp4 | nf4),
``element_bits``, ``block_size`` (None: per-tensor or per-channel), ``bits_per_weight``
(block scales and zero points amortised; per-tensor/per-channel scales not counted, see
``storage_bits(shape)`` for the exact total), ``describe()``, ``fake_quantize(x, axis=-1)``,
``encode(x, axis=-1) -> Encoded``, ``decode(enc)``, ``padding_needed(n)``, and for GPTQ-style
column-wise rounding ``scale_group_size(n_in)``, ``fit(w_cols[, tensor_amax])`` and
``quantize_with(w_cols, params)``. ``sqnr_db(x, q)`` measures the error. A NaN or inf element
is kept in place and fitted as 0 (never moving another element); ``encode`` refuses it
(docs/formats.md, "Non-finite values").

What methods and the fused kernel ask of a format (they never test its class or name):
``group_length(columns)``, ``to_groups(W)`` / ``from_groups(Wg, rows, columns)`` (one scale
group per row), ``learnable_scale`` and ``round_scale(s)`` (a free-float scale and its
storage rounding), ``element_type`` and ``round_elements(y)`` (a bare element grid whose
scales a method places itself), ``kernel_spec()`` (the Triton kernel's description of the
rule, or None: the kernel declines and the torch reference runs).

How to add a format:
1. If it needs a new element grid, add its spec and exact rounding to ``elements.py``
   (float32 in, float32 out, nearest-even, saturating; bit operations, no lookup loops).
2. Write a frozen dataclass subclass of ``Format`` (in ``scalar.py`` or ``block.py``, or a new
   module) with its configuration as fields, validated in ``__post_init__``, a canonical
   ``name`` property, and the five blocked-view functions ``_fit``, ``_fake``, ``_codes``,
   ``_values`` (+ ``_store``/``_load`` if its scales are stored in a special format). Set
   ``learnable_scale`` / ``round_scale`` and ``element_type`` / ``round_elements`` where they
   apply; return a ``kernel_spec()`` only if the kernel's rule (kernels.py ``spec``) is
   exactly yours: tests/formats/test_formats_kernel_spec.py checks that on the CPU, and a
   subclass that changes ``_fit``/``_fake`` without restating its spec is declined.
3. Extend ``FORMAT_GRAMMAR`` and the parser in ``names.py`` (one spelling per format), and add
   a canonical example to ``EXAMPLES``.
4. Add it to the reference implementation and the parametrized lists in tests/formats/; the
   round-trip, fast-vs-reference and property tests then cover it.

The name grammar (``FORMAT_GRAMMAR``, written only in ``names.py``) follows.

"""

from .base import Encoded, Format, GroupParams
from .block import MXFormat, NF4Format, NVFP4Format
from .elements import NF4_LEVELS, FixedPointSpec, MinifloatSpec
from .metrics import sqnr_db
from .names import EXAMPLES, FORMAT_GRAMMAR, FormatError, get_format
from .scalar import BaselineFormat, FloatFormat, IntFormat

__doc__ += FORMAT_GRAMMAR

__all__ = [
    "EXAMPLES", "FORMAT_GRAMMAR", "NF4_LEVELS", "BaselineFormat", "Encoded", "FixedPointSpec",
    "FloatFormat", "Format", "FormatError", "GroupParams", "IntFormat", "MXFormat",
    "MinifloatSpec", "NF4Format", "NVFP4Format", "get_format", "sqnr_db",
]
