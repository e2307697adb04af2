"""The fused Triton kernel (formats/kernels.py) against the torch reference, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ptqscale.formats import get_format, kernels

try:  # the kernels' own helpers, checked directly (test_group_division_is_ieee_division)
    import triton
    import triton.language as tl

    from ptqscale.formats import kernels_jit as jit
except ImportError:  # pragma: no cover - depends on the install
    triton = None

COVERED = ["int8", "int4_g128", "int4_g128_full", "int3_g64_asym", "int8_asym", "int4_g100",
           "int2_g16", "mxfp4", "mxfp4_ru", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2",
           "mxfp6_e2m3", "mxint8", "mxint4_b32", "mxint3_b128", "mxint6_b16", "mxfp4_b64",
           "mxfp8_e4m3_b1024", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp4_e2m1", "int8_t",
           "int4_t_full", "nvfp4", "nf4", "nf4_b128", "nf4_b100"]
NOT_COVERED = ["bf16", "fp16", "int8_t_asym"]


def edge_tensor(shape, dtype, seed=0) -> torch.Tensor:
    """Columns spanning 1e-6..1e3, an all-zero row, signed zeros, tiny and saturating values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.logspace(-6, 3, shape[-1])
    flat = x.view(-1)
    flat[:8] = torch.tensor([0.0, -0.0, 1e-30, -448.0, 3e4, 2.0**-130, -7.0, 65504.0])
    x.view(-1, shape[-1])[1] = 0.0
    return x.to(dtype)


def test_kernel_coverage_is_what_the_docs_say():
    assert all(kernels.kernel_spec(get_format(n)) is not None for n in COVERED)
    assert all(kernels.kernel_spec(get_format(n)) is None for n in NOT_COVERED)


def test_bad_kernel_name_and_missing_kernel_are_clear_errors():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="kernel='cuda'.*allowed"):
        get_format("int8").fake_quantize(x, kernel="cuda")
    with pytest.raises(ValueError, match="bf16: no Triton kernel"):
        get_format("bf16").fake_quantize(x, kernel="triton")
    with pytest.raises(ValueError, match="non-empty floating"):  # validated before any launch
        get_format("int8").fake_quantize(torch.zeros(4, 64, dtype=torch.int32), kernel="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("name", COVERED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_is_bitwise_the_reference(name, dtype):
    fmt = get_format(name)
    for shape, axes in [((8, 256), (-1, 0)), ((5, 200), (-1,)), ((2, 28672), (-1,))]:
        x = edge_tensor(shape, dtype).cuda()
        for axis in axes:
            ref = fmt.fake_quantize(x, axis, kernel="torch")
            got = fmt.fake_quantize(x, axis, kernel="triton")
            assert got.dtype == dtype and got.shape == x.shape
            assert torch.equal(got, ref), (shape, axis)
            assert torch.equal(torch.signbit(got), torch.signbit(ref)), (shape, axis)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int8", "int4_g128", "int4_g100", "fp8_e4m3", "nvfp4", "nf4",
                                  "mxfp4", "int8_t"])
def test_every_launch_candidate_and_the_tuned_one_are_the_reference(name):
    """Tile shapes and warps never change a value; the tuned launch (>= _TUNE_MIN elements,
    the first call times every candidate) is the reference too, and so is its cached launcher."""
    fmt = get_format(name)
    shapes = [(64, 4096)]
    if fmt.scale_group_size(28672) is None and not kernels.kernel_spec(fmt)["TENSOR"]:
        shapes += [(64, 14336), (64, 28672)]  # rows whole in a tile or looped; looped only
    for shape in shapes:
        x = edge_tensor(shape, torch.bfloat16, seed=4).cuda()
        ref = fmt.fake_quantize(x, kernel="torch")
        for i in range(len(kernels._candidates(fmt, *shape, kernels._n_sms(x.device.index)))):
            y = torch.empty_like(x)
            kernels._launch(x, y, fmt, choice=i)
            assert torch.equal(y, ref), (shape, i)
    big = edge_tensor((256, 4096), torch.bfloat16, seed=5).cuda()
    ref = fmt.fake_quantize(big, kernel="torch")
    for _ in range(2):  # tuned, then the cached launcher
        assert torch.equal(fmt.fake_quantize(big), ref)
    assert (fmt, 256, 4096, torch.bfloat16, big.device.index) in kernels.CHOSEN


@pytest.mark.gpu
@pytest.mark.parametrize("name", COVERED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_keeps_non_finite_like_the_reference(name, dtype):
    """NaN / +-inf stay in place and never move a scale, in both kernel layouts (a NaN's
    payload and sign may differ between the two casts back to bf16: compared as NaN)."""
    fmt = get_format(name)
    for shape, axes in [((8, 256), (-1, 0)), ((5, 200), (-1,)), ((2, 28672), (-1,))]:
        x = edge_tensor(shape, dtype, seed=4)
        flat = x.view(-1)
        flat[[11, 40, 77, flat.numel() - 1]] = torch.tensor(
            [float("nan"), float("inf"), -float("inf"), float("nan")], dtype=dtype)
        x.view(-1, shape[-1])[1, :5] = float("inf")
        x = x.cuda()
        for axis in axes:
            ref = fmt.fake_quantize(x, axis, kernel="torch")
            got = fmt.fake_quantize(x, axis, kernel="triton")
            assert torch.equal(torch.isnan(got), torch.isnan(ref)), (shape, axis)
            keep = ~torch.isnan(ref)
            assert torch.equal(got[keep], ref[keep]), (shape, axis)
            assert torch.equal(torch.signbit(got[keep]), torch.signbit(ref[keep])), (shape, axis)
            assert torch.equal(torch.isfinite(got), torch.isfinite(x)), (shape, axis)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int4_g128", "int3_g64_asym", "mxfp6_e3m2", "mxint8",
                                  "fp8_e4m3", "nvfp4", "nf4"])
def test_fp16_and_3d_inputs(name):
    fmt = get_format(name)
    x = edge_tensor((3, 4, 96), torch.float16, seed=2).cuda()
    for axis in (-1, 1):
        assert torch.equal(fmt.fake_quantize(x, axis), fmt.fake_quantize(x, axis, kernel="torch"))


@pytest.mark.gpu
def test_default_on_cuda_is_the_kernel_and_non_contiguous_input_works():
    x = edge_tensor((64, 512), torch.bfloat16, seed=3).cuda().t()  # axis -1 not contiguous
    fmt = get_format("mxint4_b32")
    assert torch.equal(fmt.fake_quantize(x), fmt.fake_quantize(x, kernel="torch"))


@pytest.mark.gpu
def test_autograd_inputs_take_the_reference_graph():
    x = edge_tensor((8, 256), torch.float32).cuda().requires_grad_()
    y = get_format("int4_g128").fake_quantize(x)
    assert y.grad_fn is not None  # the kernel has no backward; the reference does


@pytest.mark.gpu
@pytest.mark.parametrize("wide", [False, True])
def test_group_division_is_ieee_division(wide):
    """``kernels_jit._div`` (a per-group reciprocal and Markstein's correction) against the
    GPU's IEEE division: every float32 significand of the dividend, both signs, against
    divisors that cover what each caller divides by. Not ``wide``: every fp16 significand at
    the INT scales' extreme and middle binades. ``wide``: 4096 random float32 divisors over
    the whole range (subnormals and the largest binades included), the dividend 2**-40 to 2**8
    times the divisor. Bitwise equal wherever the quotient is at least 2**-100; below that both
    must be zeros or tiny numbers of the same sign (every grid rounds them to a signed zero)."""
    if triton is None:
        pytest.skip("needs triton")
    gen = torch.Generator().manual_seed(0)
    if wide:
        bits = torch.randint(1, 2**31 - 2**23, (4096,), generator=gen, dtype=torch.int64)
        d = bits.to(torch.int32).view(torch.float32)  # positive, finite, subnormals included
        ed = torch.where(d > 0, d.log2().floor(), torch.zeros_like(d)).to(torch.int32)
        e = (ed + torch.randint(-40, 9, (4096,), generator=gen)).clamp(-126, 127).to(torch.int32)
    else:
        sig = 1 + torch.arange(1024) / 1024
        d = torch.cat([sig * 2.0**k for k in (-24, -14, 0, 15)]).clamp(max=65504)
        d = d.to(torch.float16).float()
        e = torch.zeros(d.numel(), dtype=torch.int32)
    d, e = d.cuda(), e.cuda()
    bad = torch.zeros(1, dtype=torch.int32, device="cuda")
    block = 4096
    _division_check[(d.numel(), 2**24 // block)](d, e, bad, WIDE=wide, BLOCK=block)
    assert bad.item() == 0


if triton is not None:
    @triton.jit
    def _division_check(d_ptr, e_ptr, bad_ptr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        """Counts where ``jit._div`` and IEEE division disagree (test above): program (i, j)
        divides the j-th block of dividends in binade e[i], both signs, by d[i]."""
        d = tl.load(d_ptr + tl.program_id(0))
        e = tl.load(e_ptr + tl.program_id(0))
        m = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        x = (((e + 127) << 23) | (m >> 1) | ((m & 1) << 31)).to(tl.float32, bitcast=True)
        got = jit._div(x, d, WIDE)
        ref = tl.math.div_rn(x, d)
        gb, rb = got.to(tl.int32, bitcast=True), ref.to(tl.int32, bitcast=True)
        tiny = (tl.abs(ref) < 2.0**-100) & (tl.abs(got) < 2.0**-100) & ((gb < 0) == (rb < 0))
        tl.atomic_add(bad_ptr, tl.sum((~((gb == rb) | tiny)).to(tl.int32)))
