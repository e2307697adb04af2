"""One policy for NaN and +-inf in every format (docs/formats.md, "Non-finite values").

A non-finite element is kept as it is; every other element is quantized exactly as if it were
0. The expectation is built independently: the slow reference (formats_reference.py) on the
tensor with its non-finite entries zeroed, the entries then put back (a plain cast for the
16-bit baselines).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from formats_reference import reference

from ptqscale.formats import EXAMPLES, get_format, sqnr_db

NAMES = sorted(set(EXAMPLES) | {"int8_t_asym", "int4_t_full", "mxfp8_e4m3_ru", "nf4_b16"})
SPECIALS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
ROWS, COLS = 5, 200   # 200: a short last block for every block length in NAMES but 8/100


def poisoned(value: float, seed: int = 0) -> torch.Tensor:
    """Gaussian rows of mixed scales with ``value`` at the first and the last element, inside
    a block, next to the row's largest element, filling a whole row, and a NaN and an inf
    together in one row (the other specials, whatever ``value`` is)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, COLS, generator=gen) * torch.logspace(-2, 1, ROWS)[:, None]
    x[0, 0] = x[0, COLS - 1] = x[0, 37] = value
    x[1, 70] = 50.0
    x[1, 71] = value          # beside the outlier that sets its group's scale
    x[2] = value              # a row (every group of it) holds nothing finite
    x[3, 5], x[3, 150] = math.nan, -math.inf
    x[4, 191] = value         # in the short last block
    return x


def expected(name: str, x: torch.Tensor) -> torch.Tensor:
    fmt = get_format(name)
    finite = torch.isfinite(x)
    if fmt.family == "baseline":   # a cast keeps NaN and inf
        return x.to({"bf16": torch.bfloat16, "fp16": torch.float16}[name]).to(torch.float32)
    zeroed = torch.where(finite, x, torch.zeros_like(x))
    want = torch.from_numpy(np.asarray(reference(name)(zeroed.numpy()), dtype=np.float32))
    return torch.where(finite, want, x)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal values and signs, NaN where and only where expected, inf with its sign."""
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    keep = ~torch.isnan(want)
    assert torch.equal(got[keep], want[keep])
    assert torch.equal(torch.signbit(got[keep]), torch.signbit(want[keep]))


@pytest.mark.parametrize("special", SPECIALS)
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_is_kept_and_never_moves_a_scale(name, special):
    x = poisoned(SPECIALS[special])
    got = get_format(name).fake_quantize(x)
    assert_same(got, expected(name, x))
    # the same on the other axis, as a bf16 tensor (computed in fp32, returned in bf16)
    xb = x.to(torch.bfloat16)
    got_t = get_format(name).fake_quantize(xb, axis=0)
    want_t = expected(name, xb.float().T.contiguous()).T.to(torch.bfloat16)
    assert got_t.dtype == torch.bfloat16
    assert_same(got_t.float(), want_t.float())


@pytest.mark.parametrize("name", ["int4", "int8_t", "fp8_e4m3", "mxfp4", "nvfp4", "nf4"])
def test_non_finite_count_is_the_inputs(name):
    """What the runner relies on: a quantized tensor is non-finite exactly where its input is."""
    x = poisoned(math.nan)
    x[1, 3] = math.inf
    q = get_format(name).fake_quantize(x)
    assert torch.equal(torch.isfinite(q), torch.isfinite(x))


@pytest.mark.parametrize("name", ["int4_g128_asym", "fp8_e5m2", "mxint8", "nvfp4", "nf4_b128"])
def test_encode_refuses_non_finite_with_the_place(name):
    x = poisoned(math.inf)
    with pytest.raises(ValueError, match=rf"{name}\.encode: .* non-finite .*first at index "
                                         r"\(0, 0\)"):
        get_format(name).encode(x)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_baseline_codes_hold_non_finite(name):
    """The 16-bit baselines' codes are raw bit patterns: encode keeps NaN / inf (a cast)."""
    fmt = get_format(name)
    x = poisoned(-math.inf)
    assert_same(fmt.decode(fmt.encode(x)), fmt.fake_quantize(x))


@pytest.mark.parametrize("name", ["int3_g64_asym", "int4_g128_full", "mxfp4", "nvfp4", "nf4",
                                  "fp8_e4m3", "int8_t"])
def test_gptq_hook_follows_the_same_policy(name):
    """fit ignores non-finite entries, quantize_with keeps them: group by group this is
    fake_quantize (NVFP4's tensor_amax is that of the finite values)."""
    fmt = get_format(name)
    W = poisoned(math.nan)
    W[4, 10] = -math.inf
    Wg = fmt.to_groups(W)
    ta = torch.where(torch.isfinite(W), W, 0.0).abs().amax() if fmt.needs_tensor_amax else None
    params = fmt.fit(Wg, ta)
    Q = fmt.from_groups(fmt.quantize_with(Wg, params), ROWS, COLS)
    assert Q.shape == W.shape
    assert_same(Q, fmt.fake_quantize(W))


@pytest.mark.parametrize("name", ["int8", "int4", "fp8_e4m3", "fp4_e2m1"])
def test_element_rounding_keeps_non_finite(name):
    fmt = get_format(name)
    y = torch.tensor([math.nan, math.inf, -math.inf, 3.3, -1e9])
    r = fmt.round_elements(y)
    assert torch.isnan(r[0]) and r[1] == math.inf and r[2] == -math.inf
    assert r[3] == fmt.round_elements(y[3:4])[0] and r[4] == -fmt.element_max


def test_sqnr_of_non_finite_tensors_is_nan_not_an_error():
    x = torch.tensor([1.0, 70000.0])
    assert math.isnan(sqnr_db(x, get_format("fp16").fake_quantize(x)))   # 70000 -> inf
    assert math.isnan(sqnr_db(poisoned(math.nan), poisoned(math.nan)))
