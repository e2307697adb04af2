"""GPTQ on whole models: plumbing (captured inputs, Hessians, groups), the record, the cache."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ptqscale.errors import ConfigError
from ptqscale.formats import get_format
from ptqscale.methods import GPTQConfig, QuantContext, TargetsConfig, quantize
from ptqscale.methods import capture as capture_mod
from ptqscale.methods.capture import capture_block_inputs, collect_hessians, input_groups, run_block
from ptqscale.methods.gptq import gptq_quantize
from ptqscale.models import get_anatomy

BLOCK_LINEARS = 2 * 7


@pytest.fixture
def tiny_llama():
    """A random 2-block Llama (hidden 32, MLP 64): GPTQ's column loop stays short on CPU."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(0, 64, (6, 24), generator=torch.Generator().manual_seed(0))


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_hessians(model, calib) -> dict[str, torch.Tensor]:
    """H = 2/n X^T X of every linear's inputs in the full-precision model, from plain hooks."""
    acts: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(
        lambda mod, args, name=name: acts.setdefault(name, []).append(args[0].reshape(
            -1, args[0].shape[-1]).double()))
        for name, m in get_anatomy(model).targets.items()]
    with torch.no_grad():
        model(input_ids=calib)
    for h in handles:
        h.remove()
    return {n: (2 / torch.cat(x).shape[0] * torch.cat(x).T @ torch.cat(x)) for n, x in acts.items()}


def test_plumbing_finds_groups_and_the_hessians_of_plain_hooks(tiny_llama, calib):
    anat = get_anatomy(tiny_llama)
    ref = reference_hessians(tiny_llama, calib)
    cpu = torch.device("cpu")
    inputs = capture_block_inputs(tiny_llama, anat.blocks[0], calib, 4, cpu)
    assert [x.shape[0] for x in inputs.hidden] == [4, 2]  # batches of 4 sequences
    groups = input_groups(anat.blocks[0], anat.block_order, inputs)
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                      ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    for i, block in enumerate(anat.blocks):
        hessians, out = collect_hessians(block, groups, inputs, cpu, storage=cpu)
        for g in groups:
            for rel in g:  # every member of a group reads the same input
                H, tokens = hessians[g[0]]
                assert tokens == 6 * 24
                torch.testing.assert_close(H.double(), ref[f"model.layers.{i}.{rel}"],
                                           rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.hidden[0], run_block(block, inputs, cpu, cpu).hidden[0])
        inputs = out


def test_fp_inputs_equal_gptq_of_each_layer_on_full_precision_hessians(tiny_llama, calib):
    ref_h = reference_hessians(tiny_llama, calib)
    before = weights(tiny_llama)
    cfg = GPTQConfig(format="int4_g16", fp_inputs=True, hessian_cache=False, device="cpu")
    report = quantize(tiny_llama, cfg, QuantContext(calibration=calib))
    after = weights(tiny_llama)
    assert len(report.layers) == BLOCK_LINEARS
    for layer in report.layers:
        W = before[layer["name"] + ".weight"]
        Q, _ = gptq_quantize(W, ref_h[layer["name"]].float(), get_format("int4_g16"))
        mismatch = (after[layer["name"] + ".weight"] - Q).abs().gt(1e-6).float().mean()
        assert mismatch < 0.01, layer["name"]


def test_record_fields_and_gptq_beats_rtn_per_layer(tiny_llama, calib):
    before = weights(tiny_llama)
    report = quantize(tiny_llama, GPTQConfig(format="mxint4_b16", device="cpu"),
                      QuantContext(calibration=calib, calibration_hash="abc"))
    after = weights(tiny_llama)
    quantized = {layer["name"] + ".weight" for layer in report.layers}
    assert len(quantized) == BLOCK_LINEARS
    for name, w in before.items():  # embeddings, norms and head untouched
        assert (name in quantized) != torch.equal(after[name], w), name
    for layer in report.layers:
        assert layer["out_err_gptq"] <= layer["out_err_rtn"], layer["name"]
        assert layer["percdamp"] == 0.01 and layer["retries"] == 0
        assert layer["hessian_cache"] == "off" and layer["hessian_tokens"] == 6 * 24
    extra = report.extra
    assert extra["gptq"]["percdamp"] == 0.01 and extra["gptq"]["device"] == "cpu"
    assert extra["calibration"] == {"nsamples": 6, "seqlen": 24, "hash": "abc"}
    assert extra["hessian_cache"]["enabled"] is False and "fp_inputs" in \
        extra["hessian_cache"]["reason"]
    assert report.to_dict()["damp_retries"] == 0


def test_same_seed_and_config_give_identical_weights(tiny_llama, calib):
    cfg = GPTQConfig(format="int3_g16_asym", actorder=True, device="cpu")
    runs = []
    for _ in range(2):
        model = copy.deepcopy(tiny_llama)
        quantize(model, cfg, QuantContext(calibration=calib))
        runs.append(weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_hessian_cache_hit_on_second_run_skips_forward(tiny_llama, calib, tmp_path,
                                                         monkeypatch):
    cfg = GPTQConfig(format="int4_g16", fp_inputs=True, device="cpu")
    ctx = QuantContext(calibration=calib, calibration_hash="h1", cache_dir=str(tmp_path))
    first_model = copy.deepcopy(tiny_llama)
    first = quantize(first_model, cfg, ctx)
    assert first.extra["hessian_cache"]["misses"] == BLOCK_LINEARS
    assert not first.extra["hessian_cache"]["hit"]

    def no_forward(*args, **kwargs):
        raise AssertionError("a full cache hit must not run the model")

    monkeypatch.setattr(capture_mod, "capture_block_inputs", no_forward)
    second_model = copy.deepcopy(tiny_llama)
    second = quantize(second_model, GPTQConfig(format="mxint4_b16", fp_inputs=True,
                                               device="cpu"), ctx)
    assert second.extra["hessian_cache"]["hit"] and second.extra["hessian_cache"]["hits"] == \
        BLOCK_LINEARS
    assert all(layer["hessian_cache"] == "hit" for layer in second.layers)
    # a hit gives the weights a fresh computation gives
    monkeypatch.undo()
    fresh_model = copy.deepcopy(tiny_llama)
    quantize(fresh_model, GPTQConfig(format="mxint4_b16", fp_inputs=True, hessian_cache=False,
                                     device="cpu"), ctx)
    assert all(torch.equal(a, b) for a, b in zip(weights(second_model).values(),
                                                 weights(fresh_model).values(), strict=True))


def test_partial_targets_and_missing_calibration(tiny_llama, calib):
    targets = TargetsConfig(include=["*mlp*"], exclude=["*down_proj"])
    report = quantize(tiny_llama, GPTQConfig(format="int4_g16", targets=targets, device="cpu"),
                      QuantContext(calibration=calib))
    assert sorted(layer["name"] for layer in report.layers) == [
        f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up")]
    with pytest.raises(ConfigError, match="calibration"):
        quantize(tiny_llama, GPTQConfig(device="cpu"), QuantContext())


def test_damped_inverse_factor_in_place_equals_the_textbook_chain():
    """The factor written over one buffer is bitwise the out-of-place chain
    chol(inv(chol(H + lambda I)))^T, and H is left intact (a retry needs it)."""
    from ptqscale.methods.gptq import damped_inverse_factor

    X = torch.randn(400, 48, generator=torch.Generator().manual_seed(1))
    H = X.T @ X / 400
    before = H.clone()
    U, frac, damp, retries = damped_inverse_factor(H, 0.01, 3)
    damped = H + 0.01 * torch.diag(H).mean() * torch.eye(48)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)),
                                      upper=True)
    assert torch.equal(H, before) and (frac, retries) == (0.01, 0)
    assert torch.allclose(U, expected, rtol=0, atol=1e-6)
    assert torch.equal(U, damped_inverse_factor(H, 0.01, 3)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_gives_the_same_weights_in_less_gpu_memory(tiny_llama, calib):
    """method.offload: activations and Hessians wait on the CPU; the numbers do not change."""
    wide = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=4096, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    runs, peaks = [], []
    for offload in (False, True):
        model = copy.deepcopy(wide).cuda()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        quantize(model, GPTQConfig(format="int4_g128", device="cuda", offload=offload),
                 QuantContext(calibration=calib))
        peaks.append(torch.cuda.max_memory_allocated() - base)
        runs.append(weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert peaks[1] <= peaks[0] - 4096**2 * 4  # the 4096-wide Hessian off the GPU at its peak
