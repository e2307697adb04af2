"""The fast vectorised path against the slow reference, and the API contracts around it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from formats_reference import code_points, reference

from ptqscale.formats import EXAMPLES, get_format

NAMES = sorted(set(EXAMPLES) | {"int8_t_asym", "int4_t_full", "fp8_e3m4", "mxfp8_e4m3_ru",
                                "mxint2_b8", "mxfp6_e3m2_b48_ru", "nf4_b16"})
QUANTIZED = [n for n in NAMES if get_format(n).family != "baseline"]


def weights(rows=6, cols=200, seed=0) -> torch.Tensor:
    """Gaussian rows with per-row scales spanning 1e-3..10, a heavy-tailed row and a zero row."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 1, rows)[:, None]
    z = torch.randn(3, cols, generator=gen)
    w[1] = z[0] / (z[1:].square().mean(0)).sqrt() * 0.02  # Student-t, 2 degrees of freedom
    w[2] = 0.0
    w[3, 7] = 40.0  # an outlier
    return w


@pytest.mark.parametrize("name", QUANTIZED)
def test_fast_path_equals_reference(name):
    w = weights()
    got = get_format(name).fake_quantize(w)
    np.testing.assert_array_equal(got.numpy(), reference(name)(w.numpy()))


@pytest.mark.parametrize("name", ["int4_g128", "mxfp4", "mxint4_b128", "nvfp4", "nf4", "int8"])
def test_bf16_input_computes_in_fp32_and_returns_bf16(name):
    w = weights(seed=1).to(torch.bfloat16)
    got = get_format(name).fake_quantize(w)
    assert got.dtype == torch.bfloat16 and got.shape == w.shape
    want = torch.from_numpy(reference(name)(w.float().numpy())).to(torch.bfloat16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["int4_g128", "mxfp4_b64", "nvfp4", "nf4", "int8", "bf16"])
def test_axis_is_configurable(name):
    fmt, w = get_format(name), weights(rows=4, cols=96, seed=2).reshape(4, 2, 48)
    for axis in (0, 1, -1):
        moved = fmt.fake_quantize(w.movedim(axis, -1).contiguous()).movedim(-1, axis)
        assert torch.equal(fmt.fake_quantize(w, axis=axis), moved)
    with pytest.raises(ValueError, match="axis=3"):
        fmt.fake_quantize(w, axis=3)


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_is_fake_quantize_and_counts_bits(name):
    fmt, w = get_format(name), weights(seed=3)
    enc = fmt.encode(w)
    assert torch.equal(fmt.decode(enc), fmt.fake_quantize(w))
    assert enc.nbits() == fmt.storage_bits(tuple(w.shape))
    assert enc.pad == fmt.padding_needed(200) and enc.padded == (enc.pad > 0)
    assert not enc.codes.is_floating_point()
    if fmt.family != "baseline":
        lo = int(enc.codes.min())
        span = int(enc.codes.max()) - min(lo, 0)
        assert span < 2**fmt.element_bits  # codes fit the element width


def test_padding_is_recorded():
    fmt = get_format("mxint4_b128")
    assert [fmt.padding_needed(n) for n in (128, 200, 256, 1)] == [0, 56, 0, 127]
    assert get_format("int8").padding_needed(200) == 0  # per-channel: never padded
    enc = fmt.encode(torch.randn(3, 200))
    assert enc.codes.shape == (3, 2, 128) and enc.pad == 56 and enc.padded


@pytest.mark.parametrize("name", NAMES)
def test_fit_then_quantize_with_equals_fake_quantize_group_by_group(name):
    fmt, w = get_format(name), weights(seed=4)
    n_in = w.shape[1]
    g = fmt.scale_group_size(n_in) or n_in
    kw = {"tensor_amax": w.abs().amax()} if fmt.needs_tensor_amax else {}
    parts = []
    for j in range(0, n_in, g):
        cols = w[:, j:j + g]
        params = fmt.fit(w if fmt.scale_group_size(n_in) is None else cols, **kw)
        # any subset of the group's columns rounds with the frozen params
        parts += [fmt.quantize_with(cols[:, :5], params), fmt.quantize_with(cols[:, 5:], params)]
    assert torch.equal(torch.cat(parts, dim=1), fmt.fake_quantize(w))


def test_fit_contracts():
    with pytest.raises(ValueError, match="tensor_amax"):
        get_format("nvfp4").fit(torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"\(rows, k\)"):
        get_format("mxfp4").fit(torch.randn(32))


def test_bad_tensors_fail_before_work():
    fmt = get_format("mxfp4")
    with pytest.raises(ValueError, match="floating"):
        fmt.fake_quantize(torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="non-empty"):
        fmt.fake_quantize(torch.ones(0, 32))
    with pytest.raises(ValueError, match="cannot decode"):
        get_format("mxint8").decode(fmt.encode(torch.randn(2, 32)))


@pytest.mark.parametrize("name", [n for n in QUANTIZED if not n.endswith("_full")])
def test_every_code_point_decodes_and_re_encodes(name):
    """codes -> values -> codes is the identity for every code point, in every block layout.

    Each block holds the codes of +amax and -amax (so re-fitting finds the same scale) and a
    slice of all code points; the scales come from encoding random weights.
    (``_full`` INT is excluded: GPTQ's full-range grid is not idempotent, see IntFormat.)
    """
    fmt = get_format(name)
    g = 64 if fmt.block_size is None else fmt.block_size
    probe = torch.zeros(1, g)
    probe[0, :2] = torch.tensor([1.0, -1.0])
    extremes = fmt.encode(probe).codes.reshape(-1)[:2]
    pts = code_points(fmt).to(extremes.dtype)
    rows = -(-pts.numel() // (g - 2))
    pts = pts.repeat(-(-rows * (g - 2) // pts.numel()))[: rows * (g - 2)].reshape(rows, g - 2)
    codes = torch.cat([extremes.expand(rows, 2), pts], dim=1).reshape(rows, 1, g)
    enc = fmt.encode(torch.randn(rows, g, generator=torch.Generator().manual_seed(5)))
    vals = fmt.decode(replace(enc, codes=codes))
    assert torch.isfinite(vals).all()
    again = fmt.encode(vals)
    assert torch.equal(again.codes, codes)
    torch.testing.assert_close(fmt.decode(again), vals, rtol=2e-7, atol=0)


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_baseline_equals_a_cast(name, dtype):
    fin = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, 1e-30, 1e-42, fin.tiny / 3, fin.max, fin.max * 1.01,
                             -fin.max * 1.5, float("inf"), -float("inf"), 3e38])
    x = torch.cat([weights(seed=6).reshape(-1) * 1.001, specials, torch.tensor([float("nan")])])
    got = get_format(name).fake_quantize(x)
    want = x.to(dtype).to(torch.float32)
    assert torch.equal(got[:-1], want[:-1]) and torch.isnan(got[-1])
    assert torch.equal(torch.signbit(got[:-1]), torch.signbit(want[:-1]))
    assert get_format(name).fake_quantize(x.to(dtype)).dtype == dtype


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """Inductor must not elide the fp16 scale / bf16 roundings nor mis-handle a short block."""
    import torch._dynamo

    x = (weights(rows=8, cols=200, seed=7) * 0.1).to(torch.bfloat16)
    for name in ["int4_g128", "mxfp4", "bf16"]:
        fmt = get_format(name)
        torch._dynamo.reset()
        compiled = torch.compile(fmt.fake_quantize, fullgraph=True, dynamic=False)
        inp = x.float() * 1.001 if name == "bf16" else x
        assert torch.equal(compiled(inp), fmt.fake_quantize(inp)), name


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_cuda_equals_cpu(name):
    fmt, w = get_format(name), weights(seed=8)
    assert torch.equal(fmt.fake_quantize(w.cuda()).cpu(), fmt.fake_quantize(w))
    enc = fmt.encode(w.cuda())
    assert torch.equal(fmt.decode(enc).cpu(), fmt.fake_quantize(w))


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_compile_matches_eager():
    import torch._dynamo
    import torch._inductor.config as inductor_config

    x = (weights(rows=64, cols=1000, seed=9) * 0.1).to(torch.bfloat16).cuda()
    with inductor_config.patch({"eager_numerics.division_rounding": True}):
        for name in ["int4_g128", "int3_g64_asym", "mxfp4", "mxint4_b32", "nvfp4", "nf4"]:
            fmt = get_format(name)
            torch._dynamo.reset()
            compiled = torch.compile(fmt.fake_quantize, fullgraph=True, dynamic=False)
            assert torch.equal(compiled(x), fmt.fake_quantize(x)), name
