"""Hand-computed examples written from the specs (OCP MX v1.0, NVIDIA NVFP4, QLoRA NF4, INT)."""

from __future__ import annotations

import pytest
import torch

from ptqscale.formats import get_format


def block(values, size, fill=0.0) -> torch.Tensor:
    """One row: ``values`` then ``fill`` up to ``size`` elements."""
    out = torch.full((1, size), fill)
    out[0, : len(values)] = torch.tensor(values)
    return out


def check(name, x, want, scale_codes=None):
    fmt = get_format(name)
    got = fmt.fake_quantize(x)
    assert got[0, : len(want)].tolist() == want
    if scale_codes is not None:
        assert fmt.encode(x).scale.reshape(-1).tolist() == scale_codes


def test_mxfp4_shared_scale_and_ties():
    # amax = 5.0: floor(log2 5) = 2, E2M1 emax = 2 -> k = 0, scale 2**0, E8M0 code 0 + 127 = 127.
    # E2M1 grid: 0 .5 1 1.5 2 3 4 6.  5.0 is the midpoint of 4 (code 0110, even) and 6 (0111)
    # -> 4;  -1.3 -> -1.5 (0.2 away vs 0.3);  0.26 -> 0.5;  0.25 is a 0 / 0.5 tie -> 0 (even code).
    check("mxfp4", block([5.0, -1.3, 0.26, 0.25], 32), [4.0, -1.5, 0.5, 0.0], [127])


def test_mxfp4_saturates_and_round_up_rule_does_not():
    # amax = 7.5: floor(log2 7.5) = 2 -> k = 0 -> 7.5 is above the E2M1 max 6 -> saturates to 6.
    check("mxfp4", block([7.5, 3.0], 32), [6.0, 3.0], [127])
    # _ru: 7.5 = 1.875 * 2**2 and 1.875 > 1.5 (6 = 1.5 * 2**2) -> k = 1, scale 2, code 128:
    # 7.5 / 2 = 3.75 -> 4 (0.25 away vs 0.75) -> 8.0;   3.0 / 2 = 1.5 -> 1.5 -> 3.0.
    check("mxfp4_ru", block([7.5, 3.0], 32), [8.0, 3.0], [128])
    # 6.0 = 1.5 * 2**2 is not above 1.5 * 2**2: both rules give k = 0.
    check("mxfp4_ru", block([6.0], 32), [6.0], [127])


def test_mxfp4_rn_is_compressed_tensors_rule():
    # _rn (compressed-tensors): amax rounded to one mantissa bit, halves up, then OCP's floor.
    # 7.0 = 1.75 * 2**2 rounds to 2**3 -> k = 1, code 128: 7.0 / 2 = 3.5, a 3 / 4 tie -> 4 (even
    # code) -> 8.0.  6.9 = 1.725 * 2**2 rounds to 1.5 * 2**2 -> k = 0: saturates to 6 (as OCP;
    # _ru goes up: k = 1, 6.9 / 2 = 3.45 -> 3 -> 6.0 with code 128).
    check("mxfp4_rn", block([7.0, 3.0], 32), [8.0, 3.0], [128])
    check("mxfp4_rn", block([6.9, 3.0], 32), [6.0, 3.0], [127])
    check("mxfp4_ru", block([6.9], 32), [6.0], [128])


def test_mxfp8_e4m3_example():
    # amax = 1000: floor(log2 1000) = 9, E4M3 emax = 8 -> k = 1, scale 2, code 128.
    # 1000 / 2 = 500 > 448 -> saturates to 448 -> 896.   3.3 / 2 = 1.65: step 1/8 in [1, 2)
    # -> 1.625 (0.025 away) -> 3.25.
    check("mxfp8_e4m3", block([1000.0, 3.3], 32), [896.0, 3.25], [128])


def test_mxfp8_e5m2_example():
    # amax = 1: floor(log2 1) = 0, E5M2 emax = 15 -> k = -15, code 112.  1 * 2**15 = 32768 is
    # representable (1.0 * 2**15) -> 1.0.   0.3 * 2**15 = 9830.4: step 2**11 in [2**13, 2**14)
    # -> 10240 (409.6 away vs 1638.4) -> 10240 * 2**-15 = 0.3125.
    check("mxfp8_e5m2", block([1.0, 0.3], 32), [1.0, 0.3125], [112])


def test_mxint8_example():
    # amax = 0.75: floor(log2 0.75) = -1, MXINT8 emax = 0 -> k = -1, scale 0.5, code 126.
    # elements have 6 fraction bits: 0.75 / 0.5 * 64 = 96 -> 96/64 * 0.5 = 0.75;
    # 0.01 / 0.5 * 64 = 1.28 -> 1 -> 1/64 * 0.5 = 0.0078125.
    check("mxint8", block([0.75, 0.01], 32), [0.75, 0.0078125], [126])


def test_mxint4_b128_example_and_round_up():
    # MXINT4: 2 fraction bits, codes +-7 -> max 1.75, emax 0.
    # amax 3.0: floor(log2 3) = 1 -> k = 1, scale 2: 3/2*4 = 6 -> 6/4*2 = 3.0;
    # 0.9/2*4 = 1.8 -> 2 -> 1.0;  -0.75/2*4 = -1.5 is a tie -> -2 (even) -> -1.0.
    check("mxint4_b128", block([3.0, 0.9, -0.75], 128), [3.0, 1.0, -1.0], [128])
    # amax 3.9: k = 1, 3.9/2*4 = 7.8 -> clamps to 7 -> 3.5.  _ru: 3.9 = 1.95 * 2 and
    # 1.95 > 1.75 -> k = 2, scale 4: 3.9/4*4 = 3.9 -> 4 -> 4/4*4 = 4.0.
    check("mxint4_b128", block([3.9], 128), [3.5], [128])
    check("mxint4_b128_ru", block([3.9], 128), [4.0], [129])


def test_mx_zero_block_and_padding():
    # an all-zero block: floor(log2 0) = -inf -> clamped to the E8M0 minimum k = -127 (code 0).
    x = torch.cat([block([], 32), block([2.0], 8)], dim=1)  # 40 columns -> padded to 64
    enc = get_format("mxfp4").encode(x)
    assert enc.scale.reshape(-1).tolist() == [0, 127 + 1 - 2] and enc.pad == 24
    assert get_format("mxfp4").fake_quantize(x)[0, 32].item() == 2.0


def test_nvfp4_example():
    # tensor amax 2688 -> tensor scale 2688 / (6 * 448) = 1 exactly.
    # block A (amax 2688): block scale E4M3(2688/6 / 1) = 448; 2688/448 = 6 -> 6 -> 2688;
    #   1000/448 = 2.23 -> 2 -> 896.
    # block B (amax 30): 30/6 = 5 = 1.25 * 2**2 is an E4M3 value -> 5; 30/5 = 6 -> 30;
    #   7/5 = 1.4 -> 1.5 -> 7.5;  -12/5 = -2.4 -> -2 -> -10.
    # block C (amax 1): 1/6 = 0.1667, E4M3 step in [1/8, 1/4) is 2**-6 -> 10.67 steps -> 11
    #   -> 0.171875;  1/0.171875 = 5.82 -> 6 -> 1.03125 (rounds up);  0.4/0.171875 = 2.33 -> 2
    #   -> 0.34375.
    x = torch.cat([block([2688.0, 1000.0], 16), block([30.0, 7.0, -12.0], 16),
                   block([1.0, 0.4], 16)], dim=1)
    fmt = get_format("nvfp4")
    got = fmt.fake_quantize(x)[0]
    assert got[[0, 1, 16, 17, 18, 32, 33]].tolist() == [2688.0, 896.0, 30.0, 7.5, -10.0,
                                                        1.03125, 0.34375]
    enc = fmt.encode(x)
    assert enc.tensor_scale.item() == 1.0
    # E4M3 codes: 448 = 0 1111 110; 5 = 1.25 * 2**2 -> 0 1001 010; 0.171875 = 1.375 * 2**-3
    # -> 0 0100 011
    assert enc.scale.reshape(-1).tolist() == [0b01111110, 0b01001010, 0b00100011]
    # scaling the tensor by 2**-10 only moves the tensor scale: 2**-10
    assert torch.equal(fmt.fake_quantize(x * 2.0**-10), got[None] * 2.0**-10)
    assert fmt.encode(x * 2.0**-10).tensor_scale.item() == 2.0**-10


def test_nvfp4_non_power_of_two_tensor_scale():
    # amax 12 -> tensor scale 12/2688 = 1/224;  block scale E4M3(2 * 224) = 448; 12 -> 6 (code 7)
    x = block([12.0, -3.0], 16)
    fmt = get_format("nvfp4")
    enc = fmt.encode(x)
    assert enc.tensor_scale.item() == pytest.approx(1 / 224, rel=1e-7)
    # -3/12*6 = -1.5 = -(1.1b * 2**0): sign 1, exponent field 0+1 = 01, mantissa 1 -> 1011
    assert enc.codes.reshape(-1)[:2].tolist() == [0b0111, 0b1011]
    assert fmt.fake_quantize(x)[0, :2].tolist() == pytest.approx([12.0, -3.0], rel=1e-6)


def test_nf4_example():
    # absmax 2.0 -> y = x / 2.  1.0 -> 0.5: levels 0.4407 (0.059 away) and 0.5626 (0.063) -> 0.4407
    # (index 12);  0.1 -> 0.05: 0.0 vs 0.0796 (0.030 away) -> index 8;  -2.0 -> -1 (index 0);
    # -0.3 -> -0.15: -0.1848 (0.035 away) vs -0.0911 (0.059) -> index 5.  value = level * 2.
    x = torch.cat([block([1.0, 0.1, -2.0, -0.3], 64), block([], 64)], dim=1)
    fmt = get_format("nf4")
    enc = fmt.encode(x)
    assert enc.codes.reshape(-1)[:4].tolist() == [12, 8, 0, 5]
    assert enc.codes.reshape(-1)[64:].unique().tolist() == [7]  # the zero block -> level 0.0
    assert enc.scale.reshape(-1).tolist() == [2.0, 1.0]  # absmax; a zero block stores 1
    got = fmt.fake_quantize(x)[0, :4].tolist()
    assert got == [2 * 0.44070982933044434, 2 * 0.07958029955625534, -2.0, 2 * -0.18477343022823334]


def test_int_examples_with_fp16_scales():
    # int4 sym: amax 1.4 -> 1.4/7 = 0.2 -> fp16 0.199951171875.  0.5 / 0.19995 = 2.5006 -> 3
    # (with an exact 0.2 it would be a tie -> 2: the stored scale is what counts) -> 0.59985;
    # 1.4 -> 7.0017 -> 7 -> 1.39966.
    s = 0.199951171875
    check("int4_g128", block([1.4, 0.5], 128), [7 * s, 3 * s], [s])
    # GPTQ's full range: amax 1.5 -> 2*1.5/15 = 0.2 -> fp16 s; 1.5/s = 7.5018 -> 8 -> clamp 7;
    # -1.5 -> -8 (the extra negative level) -> -1.59961.
    check("int4_g128_full", block([1.5, -1.5], 128), [7 * s, -8 * s])
    # int3 asym: range [-0.5, 1.25] -> scale 1.75/7 = 0.25, zero point round(0.5/0.25) = 2;
    # 1.25 -> 5+2 = 7 -> 1.25;  0.3 -> round(1.2)+2 = 3 -> 0.25;  -0.5 -> 0 -> -0.5.
    x = block([1.25, 0.3, -0.5], 64)
    check("int3_g64_asym", x, [1.25, 0.25, -0.5], [0.25])
    enc = get_format("int3_g64_asym").encode(x)
    assert enc.codes.reshape(-1)[:3].tolist() == [7, 3, 0] and enc.zero.reshape(-1).tolist() == [2]


@pytest.mark.parametrize("name,vmax", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0),
                                       ("fp6_e3m2", 28.0), ("fp6_e2m3", 7.5), ("fp4_e2m1", 6.0)])
def test_per_tensor_minifloat_maps_amax_to_element_max(name, vmax):
    # scale = amax / max: the amax element is the element max exactly; 1.0 and -1.0 stay exact
    # when amax = max (scale 1).
    x = block([vmax, 1.0, -1.0], 8)
    assert get_format(name).fake_quantize(x)[0, :3].tolist() == [vmax, 1.0, -1.0]
    assert get_format(name).element_max == vmax
