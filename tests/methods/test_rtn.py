"""The method API: the registry, target selection, RTN and the full-precision baseline."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from ptqscale.errors import ConfigError
from ptqscale.formats import get_format
from ptqscale.methods import (
    MethodConfig,
    NoneConfig,
    RTNConfig,
    TargetsConfig,
    get_method,
    quantize,
    register_method,
)

BLOCK_LINEARS = 2 * 7   # 2 blocks x (q, k, v, o, gate, up, down)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_rtn_equals_fake_quantize_on_every_target_and_nothing_else(tiny_llama):
    before = weights(tiny_llama)
    fmt = get_format("int4_g32")
    report = quantize(tiny_llama, RTNConfig(format="int4_g32"))
    after = weights(tiny_llama)
    assert len(report.layers) == BLOCK_LINEARS
    quantized = {f"{layer['name']}.weight" for layer in report.layers}
    for name, w in before.items():
        if name in quantized:
            assert torch.equal(after[name], fmt.fake_quantize(w)), name
        else:   # embeddings, norms, head untouched
            assert torch.equal(after[name], w), name
    assert not any("embed" in n or "lm_head" in n for n in quantized)


def test_report_sqnr_is_the_energy_ratio(tiny_llama):
    before = weights(tiny_llama)
    report = quantize(tiny_llama, RTNConfig(format="int8"))
    after = weights(tiny_llama)
    names = [f"{layer['name']}.weight" for layer in report.layers]
    signal = sum(before[n].double().square().sum() for n in names)
    noise = sum((before[n].double() - after[n].double()).square().sum() for n in names)
    assert report.weight_sqnr_db == pytest.approx(10 * torch.log10(signal / noise).item(), rel=1e-9)
    assert report.weight_sqnr_db > 35   # 8-bit per-channel on Gaussian-like weights


def test_sqnr_rises_with_bits(tiny_llama):
    sqnr = []
    for fmt in ("int3_g32", "int4_g32", "int8"):
        model = copy.deepcopy(tiny_llama)
        sqnr.append(quantize(model, RTNConfig(format=fmt)).weight_sqnr_db)
    assert sqnr == sorted(sqnr)


def test_include_exclude_head_and_embeddings(tiny_llama):
    targets = TargetsConfig(include=["*mlp*", "lm_head"], exclude=["*down_proj"], head=True)
    report = quantize(tiny_llama, RTNConfig(format="int8", targets=targets))
    names = sorted(layer["name"] for layer in report.layers)
    assert names == ["lm_head", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                     "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    # the head is a target only when asked for, even if a pattern matches it
    report = quantize(tiny_llama, RTNConfig(format="int8", targets=TargetsConfig(include=["lm_*"])))
    assert report.layers == []


def test_none_changes_nothing(tiny_llama):
    before = weights(tiny_llama)
    report = quantize(tiny_llama, NoneConfig())
    assert report.layers == [] and report.weight_sqnr_db is None
    assert all(torch.equal(before[k], v) for k, v in weights(tiny_llama).items())


def test_bf16_rtn_is_the_16_bit_baseline_path(tiny_llama):
    before = weights(tiny_llama)
    report = quantize(tiny_llama, RTNConfig(format="bf16"))
    w = before["model.layers.0.self_attn.q_proj.weight"]
    got = weights(tiny_llama)["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(got, w.to(torch.bfloat16).to(w.dtype))
    assert report.weight_sqnr_db > 45


def test_a_created_non_finite_weight_fails_an_inherited_one_is_kept(tiny_llama):
    """fp16 overflows 1e5 to inf: the layer fails, named with the place and both values; a NaN
    that was already in the weight stays NaN (formats keep it) and is the runner's to judge."""
    from ptqscale.errors import ImplausibleResultError
    from ptqscale.methods.base import layer_stats

    q_proj = tiny_llama.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight[1, 2] = 1e5
    with pytest.raises(ImplausibleResultError, match=r"model\.layers\.0\.self_attn\.q_proj: the "
                       r"quantized weight holds 1 non-finite value\(s\) .* first at \(1, 2\): "
                       r"100000\.0 -> inf"):
        quantize(tiny_llama, RTNConfig(format="fp16"))
    w = torch.randn(4, 64)
    w[0, 3] = float("nan")
    for name in ("int4_g32", "mxfp4", "nf4", "fp8_e4m3"):
        q = get_format(name).fake_quantize(w)
        stats = layer_stats("x", w, q, 0)   # inherited: no error, no SQNR (JSON has no NaN)
        assert stats["sqnr_db"] is None and torch.isnan(q[0, 3]) and torch.isfinite(q).sum() == 255


def test_registry_is_loud():
    with pytest.raises(ConfigError, match="rtn"):
        get_method("rnt")   # close match suggested

    @dataclass
    class DupConfig(MethodConfig):
        name: str = "rtn"

    with pytest.raises(ValueError, match="twice"):
        register_method("rtn", DupConfig)(lambda m, c, x: None)
