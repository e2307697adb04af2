"""The cheaper second-order estimators (issue 23) against the exact Hessian of a tiny trained
Llama (test_hessian's model and reference), and their config validation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from test_hessian import _exact_hessian, _flat, _tiny_trained_llama

from ptqscale.errors import ConfigError
from ptqscale.metrics import hessian as hs
from ptqscale.metrics import hessian_estimators as est
from ptqscale.metrics.landscape import LandscapeConfig, measure_hessian, nll_loss
from ptqscale.metrics.second_order import _check_streamed_estimators
from ptqscale.runner.keys import landscape_identity

N_WINDOWS = 4


@pytest.fixture(scope="module")
def tiny():
    model, data = _tiny_trained_llama()
    data = data[:N_WINDOWS]
    model.set_attn_implementation("eager")  # the reference needs double backward too
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and ".layers." in n}
    per_window = [_exact_hessian(model, targets, data[b : b + 1]) for b in range(N_WINDOWS)]
    full = _exact_hessian(model, targets, data)
    model.set_attn_implementation("sdpa")  # the code under test must switch it itself
    sizes = torch.tensor([m.weight.numel() for m in targets.values()]).cumsum(0).tolist()
    return {"model": model, "data": data, "targets": targets, "H_b": per_window, "H": full,
            "bounds": list(zip([0, *sizes[:-1]], sizes))}


def _cfg(**kw) -> LandscapeConfig:
    return LandscapeConfig(max_tokens=10**6, batch_size=N_WINDOWS, **kw)


def _top(H: torch.Tensor) -> float:
    eigs = torch.linalg.eigvalsh(H)
    return float(eigs[eigs.abs().argmax()])


def test_stratified_samples_are_exact_per_window_forms(tiny):
    # the loss is the mean over equal windows, so H is the mean of the windows' Hessians
    torch.testing.assert_close(sum(tiny["H_b"]) / N_WINDOWS, tiny["H"], rtol=1e-4, atol=1e-6)
    model, data, weights = tiny["model"], tiny["data"], [m.weight for m in tiny["targets"].values()]
    with hs.double_backward_ready(model, weights):
        makes = [lambda ids=ids: hs.autograd_hvp(lambda: nll_loss(model, ids), weights)
                 for ids in data.split(1)]
        samples = est.stratified_hutchinson_samples(makes, weights, probes=8, seed=3)
    for k in range(8):  # probe k (the v1 probe seed + k) on window k mod 4, exactly
        v = _flat(hs.rademacher(weights, 3 + k))
        hv = tiny["H_b"][k % N_WINDOWS] @ v
        expect = torch.stack([v[a:b] @ hv[a:b] for a, b in tiny["bounds"]])
        torch.testing.assert_close(samples[k], expect, rtol=1e-4, atol=1e-4 * expect.abs().max())


def test_stratified_trace_within_its_spread_of_exact(tiny):
    probes = 256
    # the stratified estimator's exact spread: sum_b 2 ||offdiag H_b||^2 / (B^2 n_b)
    var = sum(2 * float((h**2).sum() - (h.diagonal() ** 2).sum()) / (probes // N_WINDOWS)
              for h in tiny["H_b"]) / N_WINDOWS**2
    exact = float(tiny["H"].trace())
    assert 4 * math.sqrt(var) < 0.12 * exact  # a check that can fail
    out = measure_hessian(tiny["model"], tiny["targets"], tiny["data"],
                          _cfg(hutchinson_probes=probes, power_iters=0,
                               hutchinson_scheme="stratified"))
    assert abs(out["hessian_trace"] - exact) < 4 * math.sqrt(var)
    assert out["hutchinson_scheme"] == "stratified"
    # one window per product: each window's graph built once (retained) for its probes
    assert out["cost_hessian_trace_tokens"] == tiny["data"].numel()


def test_stratified_needs_a_multiple_of_the_windows(tiny):
    with pytest.raises(ValueError, match="multiple of the budget's 4 windows"):
        measure_hessian(tiny["model"], tiny["targets"], tiny["data"],
                        _cfg(hutchinson_probes=6, hutchinson_scheme="stratified"))


def test_lanczos_reaches_the_exact_top_eigenvalue(tiny):
    top = _top(tiny["H"])
    lz = measure_hessian(tiny["model"], tiny["targets"], tiny["data"],
                         _cfg(hutchinson_probes=1, power_iters=40, power_tol=1e-7,
                              eig_method="lanczos"))
    pw = measure_hessian(tiny["model"], tiny["targets"], tiny["data"],
                         _cfg(hutchinson_probes=1, power_iters=40, power_tol=1e-7))
    assert lz["top_eigenvalue"] == pytest.approx(top, rel=1e-4)
    assert lz["power_converged"] and lz["eig_method"] == "lanczos"
    assert abs(lz["top_eigenvalue"] - top) <= abs(pw["top_eigenvalue"] - top) + 1e-6 * abs(top)
    assert lz["power_iters_run"] <= pw["power_iters_run"]


def test_lanczos_beats_power_iteration_on_a_crowded_top():
    # eigenvalues 5.0 and 4.9: power iteration's error shrinks like (4.9/5)^(2k); Lanczos
    # spans the 4-dimensional space in 4 products and is exact there
    A = torch.diag(torch.tensor([5.0, 4.9, 1.0, 0.5], dtype=torch.float64))
    w = [torch.zeros(4, dtype=torch.float64)]
    history: list[float] = []
    eig, iters, converged = est.lanczos(lambda v: [A @ v[0]], w, 10, 1e-12, 0, history=history)
    assert eig == pytest.approx(5.0, rel=1e-12) and iters <= 5 and converged
    power, _, _ = hs.power_iteration(lambda v: [A @ v[0]], w, 10, 0.0, 0)
    assert abs(power - 5.0) > 1e-3  # still far after 10 products
    assert len(history) == iters


def test_bf16_products_close_to_fp32_and_weights_restored(tiny):
    model, targets = tiny["model"], tiny["targets"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _cfg(hutchinson_probes=8, power_iters=20, eig_method="lanczos")
    fp32 = measure_hessian(model, targets, tiny["data"], cfg)
    bf16 = measure_hessian(model, targets, tiny["data"], replace(cfg, hvp_dtype="bfloat16"))
    # same probes and start vector: the difference is bf16 rounding of weights/activations;
    # on this 8-wide model it is large and moves with the library versions (measured: trace
    # 1-5% and top eigenvalue 5.2% when first measured; trace -5.8% and top
    # -19.9% with transformers 5.25.0, torch 2.13.0), which is why fp32 stays the default
    # (bench/results/landscape_estimators_cpu.md). The bounds catch a broken bf16 path (other
    # probes, a lost scale, products not in bf16 at all), not the rounding.
    assert bf16["hessian_trace"] == pytest.approx(fp32["hessian_trace"], rel=0.15)
    assert bf16["top_eigenvalue"] == pytest.approx(fp32["top_eigenvalue"], rel=0.35)
    print(f"bf16 vs fp32: trace {bf16['hessian_trace'] / fp32['hessian_trace'] - 1:+.2%}, "
          f"top {bf16['top_eigenvalue'] / fp32['top_eigenvalue'] - 1:+.2%}")
    assert bf16["hessian_trace"] != fp32["hessian_trace"]  # it did run in bf16
    for n, p in model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n


@pytest.mark.parametrize("key, value", [("hutchinson_scheme", "random"),
                                        ("eig_method", "arnoldi"), ("hvp_dtype", "float16")])
def test_unknown_estimator_options_fail_with_the_key(key, value):
    with pytest.raises(ConfigError, match=f"landscape.{key} must be one of"):
        LandscapeConfig(**{key: value})


def test_bf16_needs_autograd_products():
    with pytest.raises(ConfigError, match="hvp_dtype='bfloat16' needs landscape.hvp=autograd"):
        LandscapeConfig(hvp="finite_difference", hvp_dtype="bfloat16")


def test_new_options_rekey_nothing_at_their_v1_values():
    v1 = landscape_identity(LandscapeConfig())
    assert not {"hutchinson_scheme", "eig_method", "hvp_dtype"} & set(v1)
    other = landscape_identity(LandscapeConfig(eig_method="lanczos"))
    assert other == {**v1, "eig_method": "lanczos"}


def test_streamed_model_takes_the_v1_estimators_only():
    _check_streamed_estimators(LandscapeConfig())
    with pytest.raises(ConfigError, match="eig_method='lanczos' is not available for a streamed"):
        _check_streamed_estimators(LandscapeConfig(eig_method="lanczos"))
