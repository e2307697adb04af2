"""Second-order landscape features against the exact Hessian of a tiny trained Llama.

The reference is ``torch.autograd.functional.hessian`` of the same loss written
independently (``functional_call`` on the concatenated block weights): a few hundred
parameters, trained for 150 steps on a noisy repeating token pattern so that the weights
are not at initialisation and the Hessian is not degenerate.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ptqscale.errors import ConfigError
from ptqscale.metrics import hessian as hs
from ptqscale.metrics.landscape import (
    LandscapeConfig,
    measure_directional_profile,
    measure_hessian,
    measure_noise_response,
    nll_loss,
)


def _tiny_trained_llama() -> tuple[LlamaForCausalLM, torch.Tensor]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1)
    pattern = torch.randint(0, 32, (8,), generator=gen)
    clean = torch.stack([torch.roll(pattern.repeat(4), -i)[:24] for i in range(16)])
    noisy = torch.randint(0, 32, clean.shape, generator=gen)
    data = torch.where(torch.rand(clean.shape, generator=gen) < 0.3, noisy, clean)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nll_loss(model, data)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data


def _exact_hessian(model, targets, data) -> torch.Tensor:
    names = list(targets)
    shapes = [targets[n].weight.shape for n in names]
    flat0 = torch.cat([targets[n].weight.detach().reshape(-1) for n in names])

    def loss(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[f"{name}.weight"] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        logits = torch.func.functional_call(model, params, (data,), {"use_cache": False}).logits
        logits = logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))

    return torch.autograd.functional.hessian(loss, flat0, vectorize=True).double()


@pytest.fixture(scope="module")
def tiny():
    model, data = _tiny_trained_llama()
    model.set_attn_implementation("eager")  # the reference needs double backward too
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and ".layers." in n}
    H = _exact_hessian(model, targets, data)
    model.set_attn_implementation("sdpa")  # the code under test must switch it itself
    sizes = [m.weight.numel() for m in targets.values()]
    blocks = torch.tensor(sizes).cumsum(0).tolist()
    return {"model": model, "data": data, "targets": targets, "H": H,
            "bounds": list(zip([0, *blocks[:-1]], blocks))}


def _flat(v):
    return torch.cat([x.reshape(-1).double() for x in v])


def test_tiny_model_is_trained_and_has_few_hundred_params(tiny):
    n = sum(m.weight.numel() for m in tiny["targets"].values())
    assert 500 <= n <= 2000
    with torch.no_grad():
        assert float(nll_loss(tiny["model"], tiny["data"])) < 0.8 * math.log(32)  # not at init


def test_hutchinson_samples_equal_exact_quadratic_forms(tiny):
    # same probes, exact H: each per-layer sample must be v_l^T (H v)_l exactly (fp32 noise)
    weights = [m.weight for m in tiny["targets"].values()]
    H, data, model = tiny["H"], tiny["data"], tiny["model"]
    with hs.double_backward_ready(model, weights):
        batches = [(0.5, lambda ids=ids: hs.autograd_hvp(lambda: nll_loss(model, ids), weights))
                   for ids in data.split(8)]
        samples = hs.hutchinson_samples(batches, weights, probes=4, seed=7)
    for k in range(4):
        v = _flat(hs.rademacher(weights, 7 + k))
        hv = H @ v
        expect = torch.stack([v[a:b] @ hv[a:b] for a, b in tiny["bounds"]])
        torch.testing.assert_close(samples[k], expect, rtol=1e-4, atol=1e-4 * expect.abs().max())


@pytest.mark.slow
def test_hutchinson_trace_within_5_percent_of_exact(tiny):
    H, probes = tiny["H"], 300
    # the estimator's own spread with this many probes: the 5% check must not pass by luck
    off_diag = (H**2).sum() - (H.diagonal() ** 2).sum()
    assert math.sqrt(2 * off_diag / probes) < 0.05 / 3 * float(H.trace())
    cfg = LandscapeConfig(max_tokens=10**6, batch_size=16, hvp_windows=16, hutchinson_probes=probes,
                          power_iters=0)
    out = measure_hessian(tiny["model"], tiny["targets"], tiny["data"], cfg)
    assert out["hessian_trace"] == pytest.approx(float(H.trace()), rel=0.05)
    exact_layers = [float(H[a:b, a:b].trace()) for a, b in tiny["bounds"]]
    got_layers = [out["layers"][n]["hessian_trace"] for n in tiny["targets"]]
    assert sum(got_layers) == pytest.approx(out["hessian_trace"], rel=1e-9)
    assert got_layers == pytest.approx(exact_layers, rel=0.15)


def test_power_iteration_within_1_percent_of_top_eigenvalue(tiny):
    eigs = torch.linalg.eigvalsh(tiny["H"])
    top = float(eigs[eigs.abs().argmax()])
    cfg = LandscapeConfig(max_tokens=10**6, batch_size=16, hvp_windows=16, hutchinson_probes=1,
                          power_iters=30)
    out = measure_hessian(tiny["model"], tiny["targets"], tiny["data"], cfg)
    assert out["top_eigenvalue"] == pytest.approx(top, rel=0.01)
    assert 1 <= out["power_iters_run"] <= 30


def test_finite_difference_hvp_matches_exact(tiny):
    weights = [m.weight for m in tiny["targets"].values()]
    model, data, H = tiny["model"], tiny["data"], tiny["H"]
    reference = [w.detach().clone() for w in weights]
    v = hs.gaussian(weights, seed=3)
    with hs.double_backward_ready(model, weights):
        fd = hs.finite_difference_hvp(lambda: nll_loss(model, data), weights, reference, 1e-4)(v)
        ad = hs.autograd_hvp(lambda: nll_loss(model, data), weights)(v)
    exact = H @ _flat(v)
    assert (_flat(ad) - exact).norm() < 1e-4 * exact.norm()
    assert (_flat(fd) - exact).norm() < 2e-3 * exact.norm()
    assert all(torch.equal(w, r) for w, r in zip(weights, reference))  # restored bit-exactly


def test_finite_difference_gradients_run_in_full_float32(tiny):
    """A caller's TF32 (matmul precision "high") never reaches the finite difference: on an
    H100 it put the trace 55-77% off (bench/results/fd_tf32_h100.md). Set back afterwards."""
    weights = [m.weight for m in tiny["targets"].values()]
    model, data = tiny["model"], tiny["data"]
    seen = []

    def loss_fn():
        seen.append(torch.get_float32_matmul_precision())
        return nll_loss(model, data)

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        reference = [w.detach().clone() for w in weights]
        hs.finite_difference_hvp(loss_fn, weights, reference, 1e-4)(hs.gaussian(weights, 3))
        assert seen == ["highest", "highest"]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_finite_difference_measure_hessian_agrees_with_autograd(tiny):
    common = dict(max_tokens=10**6, batch_size=8, hvp_windows=8, hutchinson_probes=8,
                  power_iters=30)
    ad = measure_hessian(tiny["model"], tiny["targets"], tiny["data"], LandscapeConfig(**common))
    fd = measure_hessian(tiny["model"], tiny["targets"], tiny["data"],
                         LandscapeConfig(hvp="finite_difference", **common))
    # same probes and start vector: the only difference is the HVP (fd_eps=1e-4: ~1e-3 relative)
    assert fd["hessian_trace"] == pytest.approx(ad["hessian_trace"], rel=1e-3)
    # the truncation error is largest along the sharpest direction, which power iteration finds
    assert fd["top_eigenvalue"] == pytest.approx(ad["top_eigenvalue"], rel=2e-3)
    assert fd["cost_hessian_trace_tokens"] == 2 * 8 * tiny["data"].numel()
    # first-order gradients only: the model's own attention kernel, not eager's maps
    assert (fd["hvp_attention"], ad["hvp_attention"]) == ("sdpa", "eager")
    assert tiny["model"].config._attn_implementation == "sdpa"


def test_forward_difference_trace_is_unbiased(tiny):
    # One shared g(W) and one gradient per probe: the (h/2) v^T T[v, v] error of each product
    # is odd in v and cancels over the Rademacher probes (measured: 4e-4 at eps 1e-4 with 8
    # probes), where along one direction it is first order (the 1e-2 check would fail at 1e-3)
    common = dict(max_tokens=10**6, batch_size=8, hvp_windows=8, hutchinson_probes=8,
                  power_iters=0)
    ad = measure_hessian(tiny["model"], tiny["targets"], tiny["data"], LandscapeConfig(**common))
    fd = measure_hessian(tiny["model"], tiny["targets"], tiny["data"],
                         LandscapeConfig(hvp="finite_difference", fd_trace="forward", **common))
    assert fd["hessian_trace"] == pytest.approx(ad["hessian_trace"], rel=2e-3)
    for name, layer in ad["layers"].items():
        assert fd["layers"][name]["hessian_trace"] == pytest.approx(
            layer["hessian_trace"], rel=2e-2, abs=1e-3 * ad["hessian_trace"])
    assert fd["cost_hessian_trace_tokens"] == (8 + 1) * tiny["data"].numel()
    assert fd["fd_trace"] == "forward"


def test_forward_difference_hvp_is_first_order(tiny):
    weights = [m.weight for m in tiny["targets"].values()]
    model, data, H = tiny["model"], tiny["data"], tiny["H"]
    reference = [w.detach().clone() for w in weights]
    v = hs.gaussian(weights, seed=3)
    exact = H @ _flat(v)
    with hs.double_backward_ready(model, weights, eager=False):
        err = {eps: (_flat(hs.finite_difference_hvp(lambda: nll_loss(model, data), weights,
                                                    reference, eps, one_sided=True)(v))
                     - exact).norm() / exact.norm() for eps in (1e-3, 1e-4)}
    assert err[1e-4] < 5e-3
    assert 3 < err[1e-3] / err[1e-4] < 30  # first order in h (central: second order)
    assert all(torch.equal(w, r) for w, r in zip(weights, reference))


def test_kappa_from_noise_matches_exact_weighted_trace(tiny):
    # E[dNLL] = 0.5 sum_l sigma_l^2 tr(H_l) with sigma_l^2 = ||W_l||^2 / (numel_l 10^(s/10))
    H, targets = tiny["H"], tiny["targets"]
    kappa_exact = 0.5 * sum(
        float(m.weight.detach().double().pow(2).sum()) / m.weight.numel() * float(H[a:b, a:b].trace())
        for m, (a, b) in zip(targets.values(), tiny["bounds"])
    )
    cfg = LandscapeConfig(levels_db=[50.0, 45.0, 40.0, 30.0], seeds=48, max_tokens=10**6,
                          batch_size=16)
    out = measure_noise_response(tiny["model"], targets, tiny["data"], cfg)
    assert out["kappa_linear"] and out["kappa_min_db"] == 40.0  # 30 dB is past the linear regime
    # 48 antithetic draws: the quadratic form spreads ~25% per draw, ~4% over 48
    assert out["kappa"] == pytest.approx(kappa_exact, rel=0.15)
    hcfg = LandscapeConfig(max_tokens=10**6, batch_size=16, hvp_windows=16, hutchinson_probes=64,
                           power_iters=0)
    kappa_h = measure_hessian(tiny["model"], targets, tiny["data"], hcfg)["kappa_h"]
    assert kappa_h == pytest.approx(kappa_exact, rel=0.15)


def test_directional_profile_matches_taylor_expansion(tiny):
    # a small fixed direction D: dNLL(t) = t g.D + t^2 D^T H D / 2 + O(t^3)
    model, data, targets, H = tiny["model"], tiny["data"], tiny["targets"], tiny["H"]
    gen = torch.Generator().manual_seed(5)
    deltas = {id(m.weight): 1e-2 * m.weight.detach().abs().mean() * torch.randn(
        m.weight.shape, generator=gen) for m in targets.values()}
    weights = {id(m.weight): m.weight for m in targets.values()}
    by_value = {k: (weights[k].detach().clone(), d) for k, d in deltas.items()}

    def quantize_fn(w):  # receives a clone: find the weight it came from by value
        for ref, d in by_value.values():
            if torch.equal(ref, w):
                return w + d
        raise AssertionError("unknown weight")

    out = measure_directional_profile(model, targets, data, quantize_fn, batch_size=16)
    weights_list = [m.weight for m in targets.values()]
    loss = nll_loss(model, data)
    g = _flat(torch.autograd.grad(loss, weights_list))
    D = _flat([deltas[id(w)] for w in weights_list])
    assert out["directional_linear"] == pytest.approx(float(g @ D), rel=0.02)
    assert out["directional_quadratic"] == pytest.approx(0.5 * float(D @ H @ D), rel=0.1)
    expect_t1 = float(g @ D) + 0.5 * float(D @ H @ D)
    assert out["directional_dnll_at_t1"] == pytest.approx(expect_t1, rel=0.02)


def test_eigenvalue_takes_its_own_finite_difference_step(tiny):
    common = dict(max_tokens=10**6, batch_size=8, hvp_windows=8, hutchinson_probes=8,
                  power_iters=30, hvp="finite_difference", fd_eps=1e-2)
    ad = measure_hessian(tiny["model"], tiny["targets"], tiny["data"],
                         LandscapeConfig(**{**common, "hvp": "autograd", "fd_eps": 1e-4}))
    coarse = measure_hessian(tiny["model"], tiny["targets"], tiny["data"],
                             LandscapeConfig(**common))
    fine = measure_hessian(tiny["model"], tiny["targets"], tiny["data"],
                           LandscapeConfig(**common, fd_eps_eig=1e-4))
    # the trace keeps fd_eps (1e-2: a few percent off); the eigenvalue takes fd_eps_eig
    assert fine["hessian_trace"] == coarse["hessian_trace"] != pytest.approx(
        ad["hessian_trace"], rel=1e-2)
    assert fine["top_eigenvalue"] == pytest.approx(ad["top_eigenvalue"], rel=2e-3)
    assert coarse["top_eigenvalue"] != pytest.approx(ad["top_eigenvalue"], rel=1e-2)


@pytest.mark.parametrize("bad, match", [
    (dict(fd_trace="forward"), "needs landscape.hvp=finite_difference"),
    (dict(fd_eps_eig=1e-5), "needs landscape.hvp=finite_difference"),
    (dict(hvp="finite_difference", fd_eps_eig=0.0), "fd_eps_eig must be > 0"),
    (dict(hvp="finite_difference", fd_trace="backward"), "fd_trace must be one of"),
])
def test_finite_difference_settings_are_checked(bad, match):
    with pytest.raises(ConfigError, match=match):
        LandscapeConfig(**bad)


def test_forward_difference_cost_counts_one_shared_gradient_per_window(tiny):
    # stratified: probe k on window k mod n; each window's g(W) once, then one gradient a probe
    data = tiny["data"][:4]
    cfg = LandscapeConfig(max_tokens=10**6, batch_size=4, hutchinson_probes=8, power_iters=0,
                          hvp="finite_difference", fd_trace="forward",
                          hutchinson_scheme="stratified")
    out = measure_hessian(tiny["model"], tiny["targets"], data, cfg)
    assert out["cost_hessian_trace_tokens"] == (8 + 4) * data.shape[1]
