"""Name grammar: canonical names round-trip, bad names fail loudly with grammar and close names."""

from __future__ import annotations

import json

import pytest

from ptqscale.formats import (
    EXAMPLES,
    FORMAT_GRAMMAR,
    FixedPointSpec,
    FormatError,
    IntFormat,
    MinifloatSpec,
    MXFormat,
    NF4Format,
    get_format,
)

STUDY = ["bf16", "int8", "int4_g128", "int3_g128", "fp8_e4m3", "mxfp8_e4m3", "mxfp6_e2m3",
         "mxfp4", "mxint8", "mxint4_b32", "mxint3_b128", "nvfp4", "nf4"]
ISSUE = ["int8", "int4_g128", "int3_g64_asym", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3",
         "fp4_e2m1", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8",
         "mxint3_b128", "mxint6_b16", "mxfp4_b64", "mxint4_b128", "nvfp4", "nf4", "bf16", "fp16"]


@pytest.mark.parametrize("name", sorted(set(STUDY + ISSUE + list(EXAMPLES))))
def test_canonical_names_round_trip(name):
    fmt = get_format(name)
    assert fmt.name == name
    assert get_format(fmt.name) == fmt
    desc = fmt.describe()
    assert desc["name"] == name and json.loads(json.dumps(desc)) == desc
    assert all(v is None or isinstance(v, (str, int, float, bool)) for v in desc.values())


def test_generated_configurations_round_trip():
    fmts = [IntFormat(b, g, t, m) for b in (2, 3, 4, 8) for g, t in ((None, False),
            (None, True), (32, False), (100, False)) for m in ("sym", "full", "asym")]
    fmts += [MXFormat(FixedPointSpec(b, b - 2), blk, r) for b in range(2, 9)
             for blk in (2, 16, 32, 48, 256) for r in ("floor", "ceil")]
    fmts += [MXFormat(MinifloatSpec(e, m), blk) for e, m in ((2, 1), (4, 3), (3, 4), (2, 2))
             for blk in (16, 32, 64)]
    fmts += [NF4Format(b) for b in (16, 64, 128)]
    for fmt in fmts:
        assert get_format(fmt.name) == fmt, fmt.name


@pytest.mark.parametrize("name,family,bits,block,bpw", [
    ("bf16", "baseline", 16, None, 16.0),
    ("int8", "int", 8, None, 8.0),
    ("int4_g128", "int", 4, 128, 4 + 16 / 128),           # fp16 scale per 128
    ("int3_g64_asym", "int", 3, 64, 3 + (16 + 3) / 64),   # + 3-bit zero point
    ("fp8_e4m3", "fp", 8, None, 8.0),                     # per-tensor scale not counted
    ("mxfp4", "mx", 4, 32, 4 + 8 / 32),                   # E8M0 per 32
    ("mxint4_b128", "mx", 4, 128, 4 + 8 / 128),
    ("mxint8", "mx", 8, 32, 8.25),
    ("nvfp4", "nvfp4", 4, 16, 4 + 8 / 16),                # E4M3 per 16
    ("nf4", "nf4", 4, 64, 4 + 32 / 64),                   # fp32 absmax per 64
])
def test_features(name, family, bits, block, bpw):
    fmt = get_format(name)
    assert (fmt.family, fmt.element_bits, fmt.block_size) == (family, bits, block)
    assert fmt.bits_per_weight == pytest.approx(bpw, abs=1e-12)


def test_granularity_is_explicit_in_the_name():
    assert get_format("int8").granularity == "channel"
    assert get_format("int8_t").granularity == "tensor"
    assert get_format("int4_g128").granularity == "block"
    assert get_format("int4_g128").scale_group_size(4096) == 128
    assert get_format("int8").scale_group_size(4096) == 4096
    assert get_format("int8_t").scale_group_size(4096) is None
    assert get_format("fp8_e4m3").scale_group_size(4096) is None


@pytest.mark.parametrize("bad,expected_close", [
    ("mxint4_b0", "mxint4_b"),      # block must be >= 2
    ("int1", "int"),                # 2..16 bits
    ("fp8_e9m9", "fp8_e"),          # 1+9+9 != 8
    ("mxfp5", "mxfp"),              # no OCP 5-bit element
    ("nvfp4_b32", "nvfp4"),         # NVFP4 is fixed
    ("int9", "int"),
    ("fp8", "fp8_e"),
    ("mxfp8", "mxfp8_e"),
    ("int4_g1", "int4_g"),
    ("mxint9_b32", "mxint"),
    ("MXFP4", "mxfp4"),
    ("", None),
])
def test_bad_names_state_grammar_and_close_matches(bad, expected_close):
    with pytest.raises(FormatError) as err:
        get_format(bad)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert repr(bad) in msg and FORMAT_GRAMMAR in msg
    hint = msg.splitlines()[1]
    if expected_close is not None:
        assert hint.startswith("closest valid names: ") and expected_close in hint


@pytest.mark.parametrize("spelling,canonical", [
    ("mxfp4_b32", "mxfp4"), ("mxint8_b32", "mxint8"), ("mxint4", "mxint4_b32"),
    ("nf4_b64", "nf4"), ("int08", "int8"), ("mxfp4_e2m1", "mxfp4"),
])
def test_non_canonical_spellings_name_the_canonical_one(spelling, canonical):
    with pytest.raises(FormatError, match=f"write it as '{canonical}'") as err:
        get_format(spelling)
    assert str(err.value).splitlines()[1].startswith(f"closest valid names: {canonical}")


def test_non_string_name():
    with pytest.raises(FormatError, match="expected a str"):
        get_format(8)


def test_config_validation_in_post_init():
    with pytest.raises(ValueError, match="bits=1"):
        IntFormat(bits=1)
    with pytest.raises(ValueError, match="mutually exclusive"):
        IntFormat(bits=4, group=128, per_tensor=True)
    with pytest.raises(ValueError, match="block=0"):
        MXFormat(block=0)
    with pytest.raises(ValueError, match="e9m9"):
        MinifloatSpec(9, 9)


def test_package_imports_nothing_else_of_ptqscale():
    import ast
    import sys
    from pathlib import Path

    import ptqscale.formats as pkg

    allowed = {"torch", "numpy", "triton"} | set(sys.stdlib_module_names)  # triton: with torch
    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, (path.name, node.module)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in allowed, (path.name, alias.name)


def test_docstring_examples_run():
    import doctest

    import torch

    import ptqscale.formats as pkg
    from ptqscale.formats import base, block, elements, metrics, names, scalar

    for mod in (pkg, base, block, elements, metrics, names, scalar):
        globs = {**vars(mod), "torch": torch, "get_format": get_format,
                 "sqnr_db": pkg.sqnr_db}
        result = doctest.testmod(mod, globs=globs)
        assert result.failed == 0 and result.attempted > 0, mod.__name__
