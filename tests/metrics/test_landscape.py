"""Landscape features: config, curve summaries, the noise itself, and what is restored."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from ptqscale.errors import ConfigError
from ptqscale.metrics.landscape import (
    LandscapeConfig,
    basin_edge,
    fit_kappa,
    measure_directional_profile,
    measure_hessian,
    measure_landscape,
    measure_noise_response,
    nll_loss,
    noise_equivalent_dnll,
    select_windows,
)


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer Llama trained briefly on a repeating pattern (not at initialisation)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1)
    pattern = torch.randint(0, 32, (6,), generator=gen)
    data = torch.stack([torch.roll(pattern.repeat(6), -i)[:32] for i in range(8)])
    data = torch.where(torch.rand(data.shape, generator=gen) < 0.2,
                       torch.randint(0, 32, data.shape, generator=gen), data)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = nll_loss(model, data)
        opt.zero_grad()
        loss.backward()
        opt.step()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and ".layers." in n}
    return model.eval(), targets, data


def _cfg(**kw) -> LandscapeConfig:
    return LandscapeConfig(**{"max_tokens": 10**6, "batch_size": 8, "hvp_windows": 8, **kw})


# ---------------------------------------------------------------- config


def test_defaults_are_the_issue_budgets_and_compose_as_structured_config():
    cfg = LandscapeConfig()
    assert cfg.levels_db == [50, 40, 35, 30, 25, 20, 15, 10]
    assert (cfg.seeds, cfg.max_tokens, cfg.hutchinson_probes, cfg.power_iters) == (3, 16384, 64, 30)
    assert cfg.directional_ts == [0.25, 0.5, 0.75, 1.0] and cfg.enabled is False
    node = OmegaConf.structured(LandscapeConfig)
    assert OmegaConf.to_object(OmegaConf.merge(node, {"seeds": 5})).seeds == 5


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"levels_db": []}, "levels_db"),
        ({"levels_db": [40.0, 40.0]}, "levels_db"),
        ({"seeds": 0}, "seeds"),
        ({"hutchinson_probes": 0}, "hutchinson_probes"),
        ({"power_iters": -1}, "power_iters"),
        ({"threshold": 0.0}, "threshold"),
        ({"kappa_max_dnll": -1.0}, "kappa_max_dnll"),
        ({"hvp": "exact"}, "hvp"),
        ({"seqlen": 1}, "seqlen"),
        ({"directional_ts": [0.0, 1.0]}, "ts"),
        ({"directional_ts": [1.5]}, "ts"),
    ],
)
def test_bad_config_values_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        LandscapeConfig(**kw)


# ---------------------------------------------------------------- curve summaries


def test_fit_kappa_recovers_the_small_noise_coefficient():
    levels = [50.0, 40.0, 35.0, 30.0, 20.0, 10.0]
    x = [10 ** (-s / 10) for s in levels]
    dnll = [16 * xi + 60 * xi**2 for xi in x]  # linear, then curving up
    out = fit_kappa(levels, dnll, max_dnll=0.005)
    assert out["kappa_linear"] and out["kappa_n_levels"] == 2 and out["kappa_min_db"] == 40.0
    assert out["kappa"] == pytest.approx(16.0, rel=0.01)
    sharp = fit_kappa(levels, [1.0] * 6, max_dnll=0.005)  # nothing is small-noise
    assert not sharp["kappa_linear"] and sharp["kappa"] == pytest.approx(1.0 / 1e-5)


def test_basin_edge_interpolates_in_log_dnll():
    levels = [40.0, 30.0, 20.0, 10.0]
    dnll = [3 * 10 ** (-s / 10) for s in levels]  # exactly linear: crossing at 10 log10(30)
    assert basin_edge(levels, dnll, 0.1)["s_star_db"] == pytest.approx(10 * math.log10(30))
    assert basin_edge([30.0, 20.0], [-0.1, 0.3], 0.1)["s_star_db"] == pytest.approx(25.0)
    assert basin_edge([30.0, 20.0], [0.2, 0.5], 0.1) == {"s_star_db": None,
                                                          "s_star_bracketed": False}
    assert basin_edge([30.0, 20.0], [0.01, 0.05], 0.1)["s_star_bracketed"] is False
    unsorted = basin_edge([20.0, 40.0, 30.0], [1.0, 0.001, 0.01], 0.1)["s_star_db"]
    assert unsorted == pytest.approx(25.0)


def test_noise_equivalent_dnll():
    assert noise_equivalent_dnll(16.0, 30.0) == pytest.approx(0.016)
    with pytest.raises(ValueError, match="finite"):
        noise_equivalent_dnll(float("nan"), 30.0)


# ---------------------------------------------------------------- inputs


def test_select_windows_applies_the_token_budget():
    windows = torch.zeros(10, 16, dtype=torch.long)
    assert select_windows(windows, _cfg(max_tokens=50)).shape == (3, 16)
    with pytest.raises(ValueError, match="max_tokens"):
        select_windows(windows, _cfg(max_tokens=8))
    with pytest.raises(ValueError, match="seqlen"):
        select_windows(windows, _cfg(seqlen=32))
    with pytest.raises(ValueError, match="LongTensor"):
        select_windows(windows.float(), _cfg())


def test_bad_targets_and_tokens_fail_before_any_pass(tiny):
    model, targets, data = tiny
    with pytest.raises(ValueError, match="empty"):
        measure_noise_response(model, {}, data, _cfg())
    tied = {"a": targets["model.layers.0.mlp.up_proj"], "b": targets["model.layers.0.mlp.up_proj"]}
    with pytest.raises(ValueError, match="share one weight"):
        measure_noise_response(model, tied, data, _cfg())
    with pytest.raises(TypeError, match="nn.Linear"):
        measure_hessian(model, {"norm": model.model.norm}, data, _cfg())
    with pytest.raises(ValueError, match="vocab"):
        measure_noise_response(model, targets, data + 32, _cfg())


# ---------------------------------------------------------------- the noise and the restore


def test_noise_has_the_target_sqnr_per_layer(tiny):
    # capture each layer's weight during the noisy forwards: realised SQNR ~= the level
    model, targets, data = tiny
    ref = {n: m.weight.detach().clone() for n, m in targets.items()}
    seen: dict[str, list[float]] = {n: [] for n in targets}

    def hook(name):
        def fn(mod, args):
            err = (mod.weight - ref[name]).pow(2).sum()
            if err > 0:
                seen[name].append(float(10 * torch.log10(ref[name].pow(2).sum() / err)))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        measure_noise_response(model, targets, data, _cfg(levels_db=[20.0], seeds=2))
    finally:
        for h in handles:
            h.remove()
    for name, sqnrs in seen.items():
        assert len(sqnrs) == 4, name  # 2 seeds x (+noise, -noise), one batch each
        # ||noise||^2 / sigma^2 ~ chi2(n) / n: relative sd sqrt(2/n) per draw, 2 draws; 4 sd in dB
        tol_db = 4 * 10 / math.log(10) * math.sqrt(2 / (2 * targets[name].weight.numel()))
        assert sum(sqnrs) / 4 == pytest.approx(20.0, abs=tol_db), name


def test_dnll_rises_as_sqnr_falls_and_weights_are_restored(tiny):
    model, targets, data = tiny
    before = {n: m.weight.detach().clone() for n, m in targets.items()}
    out = measure_noise_response(model, targets, data, _cfg(levels_db=[40.0, 30.0, 20.0, 10.0]))
    curve = [out[f"dnll_at_{s}db"] for s in (40, 30, 20, 10)]
    assert all(a < b for a, b in zip(curve, curve[1:])), curve
    assert curve[0] > 0
    assert all(torch.equal(m.weight, before[n]) for n, m in targets.items())
    assert out["cost_noise_response_tokens"] == data.numel() * (1 + 4 * 3 * 2)


def test_bf16_model_is_measured_in_fp32_and_restored_bit_exactly(tiny):
    model, targets, data = tiny
    model = model.to(torch.bfloat16)
    try:
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        assert model.config._attn_implementation == "sdpa"
        out = measure_landscape(model, targets, data, _cfg(hutchinson_probes=2, power_iters=2))
        state = model.state_dict()
        assert all(state[k].dtype == v.dtype and torch.equal(state[k], v)
                   for k, v in snapshot.items())
        assert model.config._attn_implementation == "sdpa"
        assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
        assert not model.training
    finally:
        model.to(torch.float32)
    assert out["kappa_h"] > 0 and out["hessian_trace"] > 0


def test_measure_landscape_is_a_flat_json_record(tiny):
    model, targets, data = tiny
    out = measure_landscape(model, targets, data, _cfg(hutchinson_probes=4, power_iters=3))
    layers = out.pop("layers")
    assert set(layers) == set(targets)
    assert all(not isinstance(v, dict | list) for v in out.values())
    json.dumps(out, allow_nan=False)
    for key in ("kappa", "kappa_h", "kappa_ratio", "s_star_db", "hessian_trace", "top_eigenvalue",
                "dnll_at_40db", "nll_clean", "cost_noise_response_s", "cost_hessian_trace_s",
                "cost_top_eigenvalue_s", "cost_top_eigenvalue_tokens", "landscape_protocol"):
        assert key in out, key
    assert out["kappa_ratio"] == pytest.approx(out["kappa_h"] / out["kappa"])


def test_directional_profile_checks_quantize_fn_and_restores(tiny):
    model, targets, data = tiny
    before = {n: m.weight.detach().clone() for n, m in targets.items()}
    with pytest.raises(ValueError, match="shape"):
        measure_directional_profile(model, targets, data, lambda w: w[:1])
    out = measure_directional_profile(model, targets, data, lambda w: w, batch_size=8)
    assert out["directional_dnll_at_t1"] == 0.0 and out["directional_sqnr_db"] is None
    coarse = measure_directional_profile(model, targets, data, lambda w: (w * 4).round() / 4)
    assert coarse["directional_dnll_at_t1"] > 0 and coarse["directional_sqnr_db"] > 0
    assert all(torch.equal(m.weight, before[n]) for n, m in targets.items())
