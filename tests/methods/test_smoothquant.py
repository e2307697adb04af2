"""SmoothQuant: the factors of Eq. 4, an unchanged full-precision function, and what it is for
(per-tensor activations of an input with an outlier channel)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM

from ptqscale.assets import DATA as ASSETS
from ptqscale.errors import ConfigError
from ptqscale.methods import ActQuantConfig, QuantContext, RTNConfig, SmoothQuantConfig, quantize
from ptqscale.methods.smoothquant import smooth_, smoothing_factors
from ptqscale.models import ModelConfig, load_model


def _spiky_norms_(model, channel: int = 5, factor: float = 30.0) -> None:
    """Norm weights far from 1 and one outlier channel, as trained LLMs have."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = torch.rand_like(p) + 0.5
            p.data[channel] *= factor


def test_factors_follow_eq4():
    act = torch.tensor([8.0, 1.0, 0.5])
    w1, w2 = torch.tensor([[2.0, -1.0, 0.1]]), torch.tensor([[-4.0, 0.5, 0.2]])
    s = smoothing_factors(act, [w1, w2], alpha=0.5)
    expected = torch.tensor([8.0 ** 0.5 / 4.0 ** 0.5, 1.0, 0.5 ** 0.5 / 0.2 ** 0.5])
    torch.testing.assert_close(s, expected)


def test_smoothing_leaves_the_tiny_llama_function_unchanged(tiny_llama):
    _spiky_norms_(tiny_llama)
    ids = torch.randint(0, 128, (3, 24))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    groups = smooth_(tiny_llama, ids, alpha=0.5, batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, ref, rtol=1e-4, atol=1e-5)
    smoothed = [g for g in groups if g["smoothed"]]
    assert [g["folded_into"].split(".")[-1] for g in smoothed] == \
        ["input_layernorm", "post_attention_layernorm"] * 2
    assert all(g["s_max"] > g["s_min"] for g in smoothed)
    assert {g["group"][0].split(".")[-1] for g in groups if not g["smoothed"]} == \
        {"o_proj", "down_proj"}


def test_a_float64_model_is_smoothed_too(tiny_llama):
    """The fold check runs in the model's precision: in fp32 a float64 model's tolerance
    refused every fold and SmoothQuant (and AWQ, which shares it) silently smoothed nothing."""
    model = copy.deepcopy(tiny_llama).double()
    _spiky_norms_(model)
    ids = torch.randint(0, 128, (3, 24))
    with torch.no_grad():
        ref = model(ids).logits
    groups = smooth_(model, ids, alpha=0.5, batch_size=2)
    assert [g["folded_into"].split(".")[-1] for g in groups if g["smoothed"]] == \
        ["input_layernorm", "post_attention_layernorm"] * 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-10, atol=1e-10)


def test_smoothing_leaves_stories260k_unchanged():
    path = ASSETS / "models" / "stories260K" / "stories260K.gguf"
    model, _ = load_model(ModelConfig(name="stories260k", path=str(path), max_seqlen=512))
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    groups = smooth_(model, ids, alpha=0.5)
    assert sum(g["smoothed"] for g in groups) == 2 * len(model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_a_norm_that_scales_by_one_plus_weight_is_not_folded():
    torch.manual_seed(0)
    cfg = GemmaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = GemmaForCausalLM(cfg).eval()
    _spiky_norms_(model)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    groups = smooth_(model, ids, alpha=0.5)
    assert not any(g["smoothed"] for g in groups)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref)


def test_smoothing_helps_per_tensor_activations_with_an_outlier_channel(tiny_llama):
    _spiky_norms_(tiny_llama, factor=100.0)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    act = ActQuantConfig(format="int8", granularity="per_tensor")
    errors = {}
    for name, cfg in [("plain", RTNConfig(format="int8", activations=act)),
                      ("smooth", SmoothQuantConfig(format="int8", activations=act, alpha=0.5))]:
        model = copy.deepcopy(tiny_llama)
        report = quantize(model, cfg, QuantContext(calibration=ids))
        with torch.no_grad():
            errors[name] = float((model(ids).logits - ref).square().mean())
        assert report.extra["activations"]["kernel_proportion"] is not None
    assert report.extra["smoothquant"]["smoothed_groups"] == 4
    assert errors["smooth"] < errors["plain"], errors


@pytest.mark.parametrize("kw, needle", [
    (dict(activations=None), "activations"),
    (dict(alpha=1.2), "alpha"),
    (dict(format="int5_x"), "int5_x"),
])
def test_config_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        SmoothQuantConfig(**kw)
