"""sqnr_db, and how SQNR orders the formats on Gaussian and heavy-tailed weights."""

from __future__ import annotations

import math

import pytest
import torch

from ptqscale.formats import get_format, sqnr_db


def test_sqnr_db_values():
    x = torch.tensor([3.0, 4.0])
    assert sqnr_db(x, torch.tensor([3.0, 4.5])) == pytest.approx(20.0)  # 25 / 0.25 = 100
    assert sqnr_db(x, x.clone()) == math.inf
    assert sqnr_db(torch.zeros(2), torch.ones(2)) == -math.inf
    assert sqnr_db(x.to(torch.bfloat16), x.to(torch.bfloat16)) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(x, torch.zeros(3))


def _weights():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 64, 1024, generator=gen)
    return {
        "gaussian": z[0],
        "laplace": z[0] * z[1] + z[2] * z[3],  # a difference of two products: Laplace
        "student_t3": z[0] / z[1:4].square().mean(0).sqrt(),
    }


WEIGHTS = _weights()


def sqnrs(names, dist):
    w = WEIGHTS[dist]
    return [sqnr_db(w, get_format(n).fake_quantize(w)) for n in names]


def assert_strictly_increasing(values, names, margin=0.2):
    for (a, na), (b, nb) in zip(zip(values, names), zip(values[1:], names[1:])):
        assert b > a + margin, f"{nb} ({b:.2f} dB) should beat {na} ({a:.2f} dB)"


RISING_BITS = [
    ["int2_g128", "int3_g128", "int4_g128", "int6_g128", "int8_g128"],
    ["mxint2_b32", "mxint3_b32", "mxint4_b32", "mxint6_b32", "mxint8"],
    ["mxint3_b128", "mxint4_b128", "mxint8_b128"],
    ["mxfp4", "mxfp6_e3m2", "mxfp8_e4m3"],                     # one more mantissa bit each
    ["mxfp4", "mxfp5_e2m2_b32", "mxfp6_e2m3", "mxfp7_e2m4_b32", "mxfp8_e2m5_b32"],
    ["fp4_e2m1", "fp6_e2m3", "fp8_e4m3"],
    ["fp6_e3m2", "fp8_e4m3"],
]
# coarsest last: SQNR falls as the group / block grows
GROWING_BLOCK = [
    ["int4_g32", "int4_g64", "int4_g128", "int4_g256", "int4", "int4_t"],
    ["mxint4_b16", "mxint4_b32", "mxint4_b64", "mxint4_b128", "mxint4_b256"],
    ["mxint3_b16", "mxint3_b32", "mxint3_b64", "mxint3_b128", "mxint3_b256"],
    ["nf4_b32", "nf4", "nf4_b128", "nf4_b256"],
    ["mxfp4_b16_ru", "mxfp4_ru", "mxfp4_b64_ru", "mxfp4_b128_ru", "mxfp4_b256_ru"],
]


@pytest.mark.parametrize("dist", list(WEIGHTS))
@pytest.mark.parametrize("chain", RISING_BITS, ids=lambda c: c[0])
def test_sqnr_rises_with_element_bits(chain, dist):
    assert_strictly_increasing(sqnrs(chain, dist), chain)


@pytest.mark.parametrize("dist", list(WEIGHTS))
@pytest.mark.parametrize("chain", GROWING_BLOCK, ids=lambda c: c[0])
def test_sqnr_falls_as_the_block_grows(chain, dist):
    assert_strictly_increasing(sqnrs(chain[::-1], dist), chain[::-1], margin=0.1)


def test_ocp_floor_scale_mxfp4_block_effect():
    """With the OCP floor rule, MXFP4 falls with the block only on heavy tails.

    On Gaussian weights a block's amax saturates (amax / 2**k in (6, 8) clips to 6) more
    often in small blocks, which outweighs the finer scales: SQNR rises slightly with the
    block. The round-up rule (``_ru``) never saturates and falls monotonically (above).
    """
    chain = ["mxfp4_b16", "mxfp4", "mxfp4_b64", "mxfp4_b128", "mxfp4_b256"]
    assert_strictly_increasing(sqnrs(chain[::-1], "student_t3"), chain[::-1], margin=0.2)
    gauss = sqnrs(chain, "gaussian")
    assert gauss[0] < gauss[3] and max(gauss) - min(gauss) < 1.0


def test_heavy_tails_hurt_coarse_scales_most():
    # per-tensor int4 loses far more on Student-t than per-group int4
    t, g = sqnrs(["int4_t", "int4_g32"], "student_t3")
    tg, gg = sqnrs(["int4_t", "int4_g32"], "gaussian")
    assert (gg - tg) < (g - t)
