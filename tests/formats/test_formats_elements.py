"""Element grids: every code point, nearest-even rounding, saturation, against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from formats_reference import NF4, minifloat_table, nonneg_grid, round_grid

from ptqscale.formats import NF4_LEVELS, FixedPointSpec, MinifloatSpec
from ptqscale.formats.elements import (
    codes_to_minifloat,
    floor_log2,
    minifloat_to_codes,
    mul_pow2,
    nf4_values,
    round_fixed_point,
    round_minifloat,
    round_nf4,
)

# (E, M, largest finite value from the OCP spec tables)
OCP = [(4, 3, 448.0), (5, 2, 57344.0), (3, 2, 28.0), (2, 3, 7.5), (2, 1, 6.0)]
OTHER = [(3, 4), (2, 2), (3, 1), (5, 1), (6, 1), (2, 5), (3, 3)]
ALL = [(e, m) for e, m, _ in OCP] + OTHER


def f32(values) -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)


@pytest.mark.parametrize("e,m,vmax", OCP)
def test_largest_finite_value_matches_spec(e, m, vmax):
    spec = MinifloatSpec(e, m)
    assert spec.max_value == vmax
    assert nonneg_grid(e, m)[0][-1] == vmax  # the brute-force enumeration agrees


@pytest.mark.parametrize("e,m", ALL)
def test_decode_every_code_matches_bit_layout(e, m):
    spec = MinifloatSpec(e, m)
    table = minifloat_table(e, m)
    codes = torch.arange(2**spec.bits, dtype=torch.int32).to(torch.uint8)
    got = codes_to_minifloat(codes, spec).double().numpy()
    want = np.array([table[c] for c in range(2**spec.bits)])
    np.testing.assert_array_equal(got, want)  # NaN positions must agree too


@pytest.mark.parametrize("e,m", ALL)
def test_every_finite_value_round_trips_exactly(e, m):
    spec = MinifloatSpec(e, m)
    finite = {c: v for c, v in minifloat_table(e, m).items() if math.isfinite(v)}
    codes = torch.tensor(list(finite), dtype=torch.int32).to(torch.uint8)
    vals = codes_to_minifloat(codes, spec)
    q = round_minifloat(vals, spec)
    assert torch.equal(q, vals) and torch.equal(torch.signbit(q), torch.signbit(vals))  # -0 kept
    assert torch.equal(minifloat_to_codes(q, spec), codes)


@pytest.mark.parametrize("e,m", ALL)
def test_midpoints_tie_to_even_and_neighbours_round_to_nearer(e, m):
    spec = MinifloatSpec(e, m)
    vals, codes = nonneg_grid(e, m)
    lo, hi = vals[:-1], vals[1:]
    mid = f32((lo + hi) / 2)  # exact: the grid has few significant bits
    even = np.where(codes[:-1] % 2 == 0, lo, hi)
    for sign in (1.0, -1.0):
        np.testing.assert_array_equal(round_minifloat(sign * mid, spec).numpy(), sign * even)
        below = torch.nextafter(sign * mid, torch.zeros_like(mid))
        above = torch.nextafter(sign * mid, sign * torch.full_like(mid, math.inf))
        np.testing.assert_array_equal(round_minifloat(below, spec).numpy(), sign * lo)
        np.testing.assert_array_equal(round_minifloat(above, spec).numpy(), sign * hi)


@pytest.mark.parametrize("e,m", ALL)
def test_random_values_match_brute_force(e, m):
    spec = MinifloatSpec(e, m)
    gen = torch.Generator().manual_seed(e * 10 + m)
    # log-uniform magnitudes from deep in the subnormals to 4x past the max, both signs
    lo, hi = math.log2(2.0**spec.emin) - spec.mbits - 3, math.log2(spec.max_value) + 2
    mag = torch.exp2(torch.empty(4000).uniform_(lo, hi, generator=gen))
    y = mag * torch.where(torch.rand(4000, generator=gen) < 0.5, -1.0, 1.0)
    want = round_grid(y.double().numpy(), *nonneg_grid(e, m))
    np.testing.assert_array_equal(round_minifloat(y, spec).double().numpy(), want)


@pytest.mark.parametrize("e,m", ALL)
def test_saturation_not_overflow(e, m):
    spec = MinifloatSpec(e, m)
    big = f32([spec.max_value * 1.01, spec.max_value * 1.99, 3e38, math.inf])
    assert torch.all(round_minifloat(big, spec) == spec.max_value)
    assert torch.all(round_minifloat(-big, spec) == -spec.max_value)
    assert torch.isnan(round_minifloat(f32([math.nan]), spec)).all()
    codes = minifloat_to_codes(round_minifloat(big, spec), spec)
    assert torch.isfinite(codes_to_minifloat(codes, spec)).all()  # never an inf/NaN code


def test_subnormals_are_used():
    spec = MinifloatSpec(2, 1)  # E2M1: subnormal 0.5 between 0 and the min normal 1.0
    y = f32([0.2, 0.25, 0.26, 0.5, 0.74, 0.75, 0.76])
    assert round_minifloat(y, spec).tolist() == [0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0]
    e4m3 = MinifloatSpec(4, 3)  # smallest subnormal 2**-9
    assert round_minifloat(f32([2.0**-9, 2.0**-10, 1.5 * 2.0**-10]), e4m3).tolist() == [
        2.0**-9, 0.0, 2.0**-9]


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_fixed_point_ties_even_and_symmetric_clamp(bits):
    spec = FixedPointSpec(bits, bits - 2)
    step = 2.0 ** -(bits - 2)
    k = torch.arange(-spec.qmax, spec.qmax + 1, dtype=torch.float32)
    assert torch.equal(round_fixed_point(k * step, spec), k.int())  # every code round-trips
    halves = (k[:-1] + 0.5) * step
    want = torch.where(k[:-1] % 2 == 0, k[:-1], k[:-1] + 1)
    assert torch.equal(round_fixed_point(halves, spec), want.int())
    assert round_fixed_point(f32([1e9, -1e9]), spec).tolist() == [spec.qmax, -spec.qmax]
    assert spec.max_value == spec.qmax * step and spec.emax == 0


def test_mxint8_element():
    spec = FixedPointSpec(8, 6)
    assert spec.max_value == 127 / 64 == 1.984375


def test_nf4_levels_and_nearest():
    assert NF4_LEVELS == tuple(NF4)
    lv = f32(NF4)
    assert torch.equal(nf4_values(round_nf4(lv)), lv)
    mids = (np.array(NF4[:-1]) + np.array(NF4[1:])) / 2  # exact midpoints (float64)
    for i, mid in enumerate(mids):
        down = np.float32(mid) if np.float32(mid) <= mid else np.nextafter(np.float32(mid), -1)
        up = np.float32(mid) if np.float32(mid) > mid else np.nextafter(np.float32(mid), 2)
        assert round_nf4(f32([down, up])).tolist() == [i, i + 1]  # nearest; a tie goes down
    y = torch.empty(2000).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    dist = (y.double()[:, None] - torch.tensor(NF4, dtype=torch.float64)).abs()
    assert torch.equal(round_nf4(y).long(), dist.argmin(dim=1))


def test_power_of_two_helpers_are_exact():
    a = f32([1.0, 1.5, 2.0, 3.999, 2.0**-126, 2.0**-127, 5e-39, 3e38, 0.0])
    want = [0, 0, 1, 1, -126, -127, -127, 127, -127]
    assert floor_log2(a).tolist() == want
    n = torch.tensor([-149, -140, -127, -126, -1, 0, 1, 127])
    want = torch.tensor([2.0 ** int(k) for k in n], dtype=torch.float64)
    assert torch.equal(mul_pow2(torch.ones(8), n).double(), want)
    assert mul_pow2(f32([3.0 * 2**100]), torch.tensor([-200])).item() == 3.0 * 2.0**-100
