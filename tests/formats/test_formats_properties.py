"""Property tests (hypothesis): idempotence, power-of-two equivariance, sign symmetry, half-step error."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from formats_reference import code_points
from hypothesis import given, settings
from hypothesis import strategies as st

from ptqscale.formats import get_format

FAST = settings(max_examples=15, deadline=None, derandomize=True, database=None)
FORMATS = ["int8", "int4_g128", "int3_g64_asym", "int4_g128_full", "int8_t", "fp8_e4m3",
           "fp8_e5m2", "fp4_e2m1", "mxfp8_e4m3", "mxfp6_e3m2", "mxfp4", "mxfp4_ru", "mxint8",
           "mxint3_b128", "mxint4_b32_ru", "nvfp4", "nf4"]
# exactly equivariant under x -> 2**j x: power-of-two or real-valued float32 scales without fp16
POW2_EQUIVARIANT = [n for n in FORMATS if get_format(n).family in ("mx", "nvfp4", "nf4", "fp")]
# nf4 levels, asymmetric INT and GPTQ's full-range grid are not symmetric about 0
SIGN_SYMMETRIC = [n for n in FORMATS if not (n.endswith(("_asym", "_full")) or n == "nf4")]

magnitude = st.one_of(st.just(0.0), st.floats(1e-12, 1e4, allow_subnormal=False))
value = st.tuples(magnitude, st.booleans()).map(lambda t: -t[0] if t[1] else t[0])


@st.composite
def tensors(draw):
    """Adversarial small rows (raw floats) or realistic ones (Gaussian / Laplace / Student-t)."""
    if draw(st.booleans()):
        vals = draw(st.lists(value, min_size=1, max_size=40))
        return torch.tensor(vals, dtype=torch.float32).reshape(1, -1)
    rows = draw(st.integers(1, 3))
    cols = draw(st.sampled_from([1, 7, 16, 33, 64, 130]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["normal", "laplace", "student"]))
    z = torch.randn(3, rows, cols, generator=gen)
    x = {"normal": z[0], "laplace": z[0] * z[1], "student": z[0] / z[1:].square().mean(0).sqrt()}[kind]
    return x * 10.0 ** draw(st.floats(-3, 2))


@pytest.mark.parametrize("name", [n for n in FORMATS if not n.endswith("_full")])
@FAST
@given(x=tensors())
def test_fake_quantize_is_idempotent(name, x):
    fmt = get_format(name)
    q = fmt.fake_quantize(x)
    qq = fmt.fake_quantize(q)
    assert torch.equal(fmt.encode(qq).codes, fmt.encode(q).codes)  # the same code points
    if fmt.family in ("int", "mx", "nf4"):  # exactly re-fitted scales
        assert torch.equal(qq, q)
    else:  # amax/448-type scales can move by an ulp when re-fitted
        torch.testing.assert_close(qq, q, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", POW2_EQUIVARIANT)
@FAST
@given(x=tensors(), j=st.integers(-16, 16))
def test_commutes_with_power_of_two_scaling(name, x, j):
    fmt = get_format(name)
    s = 2.0**j
    assert torch.equal(fmt.fake_quantize(x * s), fmt.fake_quantize(x) * s)


@pytest.mark.parametrize("name", SIGN_SYMMETRIC)
@FAST
@given(x=tensors())
def test_sign_symmetry(name, x):
    fmt = get_format(name)
    assert torch.equal(fmt.fake_quantize(-x), -fmt.fake_quantize(x))


@pytest.mark.parametrize("name", FORMATS)
@FAST
@given(x=tensors())
def test_error_at_most_half_a_step_inside_the_range(name, x):
    """Each value inside its group's grid lands on a neighbour at most half the gap away."""
    fmt = get_format(name)
    enc = fmt.encode(x)
    rows, nb, g = enc.codes.shape
    pts = code_points(fmt).to(enc.codes.dtype)
    grid_codes = pts.expand(rows, nb, pts.numel()).contiguous()
    grid = fmt.decode(replace(enc, codes=grid_codes, shape=(rows, nb * pts.numel()), pad=0))
    grid = grid.reshape(rows, nb, -1).double().sort(dim=-1).values
    xb = torch.nn.functional.pad(x, (0, enc.pad)).reshape(rows, nb, g).double()
    qb = torch.nn.functional.pad(fmt.fake_quantize(x), (0, enc.pad)).reshape(rows, nb, g).double()
    hi_i = torch.searchsorted(grid, xb).clamp(1, grid.shape[-1] - 1)
    lo, hi = grid.gather(-1, hi_i - 1), grid.gather(-1, hi_i)
    inside = (xb >= grid[..., :1]) & (xb <= grid[..., -1:])
    bound = (hi - lo) / 2 * (1 + 1e-6)
    assert torch.all(((xb - qb).abs() <= bound) | ~inside)
