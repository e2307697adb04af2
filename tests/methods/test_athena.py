"""Athena: agreement with GPTQ (group of one column, and whole scale groups), an explicit-inverse
OBS reference for larger groups, the k-means codebook against scikit-learn, the low-rank
correction, and the method on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptqscale.errors import ConfigError
from ptqscale.formats import get_format
from ptqscale.methods import AthenaConfig, QuantContext, quantize
from ptqscale.methods.athena import athena_quantize, kmeans_codebook
from ptqscale.methods.gptq import gptq_quantize


def problem(rows=16, columns=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=g)
    X = torch.randn(columns, 300, generator=g) * torch.rand(columns, 1, generator=g)
    return W, 2 / 300 * X @ X.T


def out_err(W, Q, H) -> float:
    D = (W - Q).double()
    return float(((D @ H.double()) * D).sum() / 2)


@pytest.mark.parametrize("fmt", ["int3_g32", "int2_g32", "int4", "int3_g32_asym", "mxfp4",
                                 "nvfp4", "nf4", "fp8_e4m3"])
@pytest.mark.parametrize("blocksize", [128, 16])
def test_one_column_groups_on_the_uniform_grid_are_exactly_gptq(fmt, blocksize):
    W, H = problem()
    Q, info = athena_quantize(W, H, fmt, group_size=1, blocksize=blocksize)
    ref, ref_info = gptq_quantize(W, H, fmt, blocksize=blocksize)
    assert torch.equal(Q, ref)
    assert info.loss == ref_info.loss and info.retries == ref_info.retries


def test_scale_group_sized_groups_are_exactly_mx_aware_gptq():
    W, H = problem(columns=128)
    Q, _ = athena_quantize(W, H, "int3_g32", group_size=32)
    ref, _ = gptq_quantize(W, H, "int3_g32", mx_aware=True)
    assert torch.equal(Q, ref)


def obs_reference(W, H, fmt, g, percdamp=0.01):
    """Textbook group OBS with an explicit inverse Hessian in float64: quantize a group, update
    the rest with -E Hinv_BB^-1 Hinv_BR, downdate Hinv to the remaining columns (Schur)."""
    W, H = W.double().clone(), H.double()
    H = H + percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    p = fmt.fit(W.float())  # a per-tensor format: one scale, from the original weights
    Q = torch.zeros_like(W)
    for a in range(0, W.shape[1], g):
        b = min(a + g, W.shape[1])
        Q[:, a:b] = fmt.quantize_with(W[:, a:b].float(), p).double()
        E = W[:, a:b] - Q[:, a:b]
        HBB, HBR = Hinv[:g, :g], Hinv[:g, g:]
        W[:, b:] -= E @ torch.linalg.solve(HBB, HBR)
        Hinv = Hinv[g:, g:] - Hinv[g:, :g] @ torch.linalg.solve(HBB, HBR)
    return Q.float()


@pytest.mark.parametrize("g", [4, 16])
def test_grouped_updates_match_an_explicit_inverse_obs_reference(g):
    W, H = problem(rows=32, columns=64, seed=1)
    fmt = get_format("int4_t")
    Q, _ = athena_quantize(W, H, fmt, group_size=g, blocksize=32)
    ref = obs_reference(W, H, fmt, g)
    # float32 Cholesky vs float64 inverse: a few roundings may flip near a midpoint
    assert (Q != ref).float().mean() < 0.01
    assert out_err(W, Q, H) == pytest.approx(out_err(W, ref, H), rel=0.02)
    assert out_err(W, Q, H) < out_err(W, fmt.fake_quantize(W), H)


def test_kmeans_codebook_matches_scikit_learn_lloyd():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=g)
    w = torch.rand(64, generator=g) + 0.1
    out = kmeans_codebook(x, w, 8, 20)
    for r in range(5):
        xs = x[r].double().numpy().reshape(-1, 1)
        init = np.linspace(xs.min(), xs.max(), 8).reshape(-1, 1)
        km = KMeans(8, init=init, n_init=1, max_iter=20, tol=0, algorithm="lloyd")
        km.fit(xs, sample_weight=w.double().numpy())
        ref = km.cluster_centers_[km.predict(xs)].ravel()
        np.testing.assert_allclose(out[r].numpy(), ref, atol=2e-3)  # levels stored as fp16
        assert len(out[r].unique()) <= 8
        assert torch.equal(out[r].half().float(), out[r])


def test_kmeans_groups_beat_the_uniform_grid_at_equal_bits():
    W, H = problem(rows=16, columns=256, seed=3)
    fmt = get_format("int3_g32")  # 3 + 16/32 = 3.5 bits
    Qk, info = athena_quantize(W, H, fmt, group_size=256, codebook="kmeans")  # 3 + 8*16/256
    Qu, _ = athena_quantize(W, H, fmt, group_size=32)
    assert info.storage_bits / W.numel() == pytest.approx(3.5)
    assert fmt.storage_bits(tuple(W.shape)) / W.numel() == pytest.approx(3.5)
    assert out_err(W, Qk, H) < out_err(W, Qu, H)


def test_lowrank_correction_lowers_the_error_and_is_counted():
    W, H = problem(rows=24, columns=64, seed=4)
    errs, bits = [], []
    for r in (0, 2, 8, 24):
        Q, info = athena_quantize(W, H, "int2_g32", group_size=32, lowrank_rank=r)
        errs.append(out_err(W, Q, H))
        bits.append(info.storage_bits)
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 * errs[0]
    assert [b - bits[0] for b in bits] == [16 * r * (24 + 64) for r in (0, 2, 8, 24)]


@pytest.mark.parametrize("kw, needle", [
    (dict(group_size=0), "group_size"),
    (dict(codebook="vq"), "codebook"),
    (dict(codebook="kmeans", group_size=4, format="int3_g32"), "group_size >= 8"),
    (dict(lowrank_rank=-1), "lowrank_rank"),
    (dict(format="int9"), "int9"),
])
def test_bad_configs_name_the_field(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        AthenaConfig(**kw)


def test_the_method_on_a_tiny_model(tiny_llama):
    ids = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(0))
    report = quantize(tiny_llama, AthenaConfig(format="int3_g32", device="cpu"),
                      QuantContext(calibration=ids))
    assert len(report.layers) == 2 * 7
    assert report.extra["bits_per_weight"] == pytest.approx(3.5)
    assert report.extra["out_err"] < report.extra["out_err_rtn"]
    fmt = get_format("int3_g32")
    for layer in report.layers:
        W = tiny_llama.get_submodule(layer["name"]).weight
        # on the format's grid: each 32-column group of a row holds <= 7 levels
        assert all(len(row.unique()) <= 7 for row in W.detach().reshape(-1, 32))
        assert layer["storage_bits"] == fmt.storage_bits(tuple(W.shape))
