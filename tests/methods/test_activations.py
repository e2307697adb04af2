"""Activation fake-quantization: scales against an element-wise reference, the kernel count,
the hooks on a model, config errors, and the cost entry."""

from __future__ import annotations

import copy

import pytest
import torch

from ptqscale.errors import ConfigError
from ptqscale.formats import get_format
from ptqscale.methods import ActQuantConfig, QuantContext, RTNConfig, quantize
from ptqscale.methods.activations import ActQuantizer, remove_activation_quant


def reference_quantize(X: torch.Tensor, bits: int, gran: str, alpha: float) -> torch.Tensor:
    """Element by element, as written in the CrossQuant paper (per-batch channel maxima)."""
    qmax = 2 ** (bits - 1) - 1
    n, m = X.shape
    t = [max(abs(float(X[i, j])) for j in range(m)) for i in range(n)]
    c = [max(abs(float(X[i, j])) for i in range(n)) for j in range(m)]
    out = torch.zeros_like(X)
    for i in range(n):
        for j in range(m):
            s = {"per_token": t[i], "per_channel": c[j], "per_tensor": max(t),
                 "crossquant": t[i] ** alpha * c[j] ** (1 - alpha)}[gran]
            delta = s / qmax
            out[i, j] = max(-qmax, min(qmax, round(float(X[i, j]) / delta))) * delta
    return out


@pytest.mark.parametrize("gran", ["per_token", "per_channel", "per_tensor", "crossquant"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantizer_matches_elementwise_reference(gran, bits):
    torch.manual_seed(0)
    X = torch.randn(6, 10, dtype=torch.float64) * torch.logspace(-1, 1, 10, dtype=torch.float64)
    q = ActQuantizer(ActQuantConfig(format=f"int{bits}", granularity=gran, alpha=0.3,
                                    channel_stats="per_batch"))
    expected = reference_quantize(X, bits, gran, 0.3)
    torch.testing.assert_close(q.quantize(X.float()).double(), expected, rtol=1e-5, atol=1e-6)


def test_crossquant_endpoints_are_per_token_and_per_channel():
    X = torch.randn(4, 7, 32)
    quant = lambda **kw: ActQuantizer(ActQuantConfig(channel_stats="per_batch", **kw)).quantize(X)  # noqa: E731
    assert torch.equal(quant(granularity="crossquant", alpha=1.0), quant(granularity="per_token"))
    assert torch.equal(quant(granularity="crossquant", alpha=0.0),
                       quant(granularity="per_channel"))


def test_fp8_per_tensor_equals_the_fp8_format():
    X = torch.randn(16, 32) * 3
    q = ActQuantizer(ActQuantConfig(format="fp8_e4m3", granularity="per_tensor",
                                    channel_stats="per_batch"))
    assert torch.equal(q.quantize(X), get_format("fp8_e4m3").fake_quantize(X))


def test_native_block_format_uses_its_own_blocks_along_channels():
    X = torch.randn(3, 5, 64)
    q = ActQuantizer(ActQuantConfig(format="mxfp4", granularity="native"))
    assert torch.equal(q.quantize(X), get_format("mxfp4").fake_quantize(X.reshape(15, 64))
                       .reshape(3, 5, 64))


def test_kernel_counts_nonzero_elements_that_round_to_zero():
    # one outlier channel: per-token steps are 100/7 (int4), so |x| < 50/7 rounds to zero
    X = torch.tensor([[100.0, 1.0, 0.0, -8.0], [100.0, 7.0, 0.5, 0.0]])
    q = ActQuantizer(ActQuantConfig(format="int4", granularity="per_token"))
    q.mode = "count"
    q(None, (X,))
    assert (q.kernel, q.zeros, q.total) == (3, 2, 8)  # 1.0, 7.0, 0.5; -8.0 survives
    cq = ActQuantizer(ActQuantConfig(format="int4", granularity="crossquant",
                                     channel_stats="per_batch"))
    cq.mode = "count"
    cq(None, (X,))
    assert cq.kernel < q.kernel  # the channel maxima shrink the small channels' steps


def test_calibrated_channel_maxima_are_static_and_saturate():
    q = ActQuantizer(ActQuantConfig(granularity="per_channel"))
    q.observe(torch.tensor([[1.0, 2.0], [-3.0, 0.5]]))
    assert q.channel_max.tolist() == [3.0, 2.0]
    out = q.quantize(torch.tensor([[6.0, -1.0]]))  # 6 > 3: saturates at the calibrated max
    torch.testing.assert_close(out, torch.tensor([[3.0, -1.0]]), atol=2 / 127, rtol=0)


@pytest.mark.parametrize("kw, needle", [
    (dict(granularity="per_row"), "granularity"),
    (dict(format="int4_g128"), "native"),
    (dict(format="mxfp4", granularity="per_token"), "native"),
    (dict(format="int8", granularity="native"), "native"),
    (dict(format="int8_asym"), "element type"),
    (dict(format="bf16"), "null"),
    (dict(format="int9"), "int9"),
    (dict(alpha=1.5), "alpha"),
    (dict(clip=0.0), "clip"),
    (dict(channel_stats="online"), "channel_stats"),
])
def test_config_errors_name_the_field(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        ActQuantConfig(**kw)


def test_hooks_stay_on_the_model_and_stats_land_in_the_report(tiny_llama):
    ids = torch.randint(0, 128, (4, 16))
    weight_only = copy.deepcopy(tiny_llama)
    quantize(weight_only, RTNConfig(format="int8"))
    act = ActQuantConfig(format="int4", granularity="crossquant")
    report = quantize(tiny_llama, RTNConfig(format="int8", activations=act),
                      QuantContext(calibration=ids))
    with torch.no_grad():
        assert not torch.allclose(tiny_llama(ids).logits, weight_only(ids).logits)
    summary = report.extra["activations"]
    assert len(report.layers) == 14 and all("kernel_proportion" in e for e in report.layers)
    kernel = sum(e["kernel_elements"] for e in report.layers)
    total = sum(e["act_elements"] for e in report.layers)
    assert summary["kernel_proportion"] == kernel / total and 0 < kernel < total
    assert summary["config"]["granularity"] == "crossquant"
    assert report.extra["cost"]["seconds"] > 0 and "peak_memory_bytes" in report.extra["cost"]
    remove_activation_quant(dict((n, tiny_llama.get_submodule(n)) for n in
                                 (e["name"] for e in report.layers)))
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, weight_only(ids).logits)


def test_activation_quantization_without_calibration_is_refused(tiny_llama):
    cfg = RTNConfig(format="int8", activations=ActQuantConfig())
    assert cfg.uses_calibration and not RTNConfig().uses_calibration
    with pytest.raises(ConfigError, match="calibration"):
        quantize(tiny_llama, cfg, QuantContext())
