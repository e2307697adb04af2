"""Every supported architecture end to end on a tiny random checkpoint: RTN, GPTQ (one piece
and streamed, bitwise equal), perplexity; MoE experts as per-expert linears (token counts per
expert, RTN for an expert no calibration token reaches, bytes of the expert weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import TINY_CONFIGS, tiny_one_and_streamed

from ptqscale.formats import get_format
from ptqscale.methods import AWQConfig, GPTQConfig, QuantContext, RTNConfig, quantize
from ptqscale.methods.capture import NO_TOKENS
from ptqscale.metrics import EvalConfig, measure_perplexity
from ptqscale.models import (
    MOE_ARCHITECTURES,
    UnsupportedArchitectureError,
    count_parameters,
    get_anatomy,
    split_experts,
)

FMT = "int4_g32"  # every tiny in_features (32, 64, 128) is a multiple of 32: no padding
NEW = ("falcon", "stablelm", *MOE_ARCHITECTURES)


def _calibration(n: int = 4, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(1))


def _gptq(model, **kw):
    ids = _calibration()
    return quantize(model, GPTQConfig(format=FMT, device="cpu", **kw),
                    QuantContext(calibration=ids))


@pytest.mark.parametrize("family", NEW)
def test_rtn_rounds_every_target_and_nothing_else(tmp_path, family):
    one, streamed = tiny_one_and_streamed(family, tmp_path)
    before = {k: v.clone() for k, v in one.state_dict().items()}
    anat = get_anatomy(one)
    report = quantize(one, RTNConfig(format=FMT))
    quantize(streamed, RTNConfig(format=FMT))
    fmt = get_format(FMT)
    after, other = one.state_dict(), streamed.state_dict()
    targets = {f"{n}.weight" for n in anat.targets}
    for k, v in after.items():
        expected = fmt.fake_quantize(before[k]) if k in targets else before[k]
        assert torch.equal(v, expected), k
        assert torch.equal(other[k], v), k  # streamed: the same weights, bitwise
    assert report.quantized_numel == count_parameters(one, anat)["quantizable"]


@pytest.mark.parametrize("family", NEW)
def test_gptq_streamed_is_bitwise_one_piece_and_beats_rtn(tmp_path, family):
    one, streamed = tiny_one_and_streamed(family, tmp_path)
    a, b = _gptq(one), _gptq(streamed)
    sa, sb = one.state_dict(), streamed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # every target once (an MoE block quantizes all experts' gate/up, then all downs)
    assert sorted(layer["name"] for layer in a.layers) == sorted(get_anatomy(one).targets)
    assert a.extra["out_err_gptq"] < a.extra["out_err_rtn"]  # GPTQ's objective, on its inputs
    assert a.extra == {**b.extra, "cost": a.extra["cost"]}
    stream = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(2))
    ev = EvalConfig(seqlen=64, batch_size=2)
    pa, pb = measure_perplexity(one, stream, ev), measure_perplexity(streamed, stream, ev)
    assert pa.nll_sum == pb.nll_sum and torch.isfinite(torch.tensor(pa.nll))


@pytest.mark.parametrize("family", ["falcon", "phi", "stablelm", "mixtral", "qwen2_moe"])
def test_awq_and_smoothquant_folds_keep_the_function(tmp_path, family):
    """fp16 as AWQ's 'format' is a near-identity, and smoothing alone changes no function:
    whatever is scaled and folded, the logits stay. A parallel block (falcon-7b, phi) feeds
    q/k/v and the MLP from one norm: they are one group, or a fold into that norm would
    rescale the MLP's input behind its back. Expert gate/up read a routed subset of the
    norm's output: no fold, left unscaled, saying so."""
    from ptqscale.methods.smoothquant import smooth_

    one, _ = tiny_one_and_streamed(family, tmp_path)
    ids = _calibration()
    with torch.no_grad():
        ref = one(ids).logits
    awq, smoothed = copy.deepcopy(one), copy.deepcopy(one)
    report = quantize(awq, AWQConfig(format="fp16", clip_search=False, device="cpu"),
                      QuantContext(calibration=ids))
    groups = smooth_(smoothed, ids, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(awq(ids).logits, ref, rtol=1e-2, atol=2e-3)
        torch.testing.assert_close(smoothed(ids).logits, ref, rtol=1e-4, atol=1e-5)
    scaling = {x["name"].split(".", 3)[-1]: x["scaling"] for x in report.layers[:12]}
    assert any(g["smoothed"] for g in groups)
    if family == "falcon":
        assert scaling["mlp.dense_h_to_4h"] == scaling["self_attention.query_key_value"] == \
            "folded into input_layernorm"
    if family == "mixtral":
        assert scaling["mlp.experts.0.gate_proj"].startswith("skipped")
        assert scaling["mlp.experts.0.down_proj"] == "folded into mlp.experts.0.up_proj"


def test_awq_int4_has_no_more_output_error_than_rtn_on_falcon(tmp_path):
    one, _ = tiny_one_and_streamed("falcon", tmp_path)
    report = quantize(one, AWQConfig(format=FMT, device="cpu", clip_search=False),
                      QuantContext(calibration=_calibration()))
    assert report.extra["awq"]["out_err_awq"] <= report.extra["awq"]["out_err_rtn"] * (1 + 1e-6)


# ------------------------------------------------------------------ mixture of experts


def _route_counts(model, ids) -> dict[str, int]:
    """Tokens each expert receives in the full-precision model (hooks on the routers)."""
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            def hook(mod, args, out, name=name):
                chosen = torch.bincount(out[2].reshape(-1), minlength=4)
                for k, c in enumerate(chosen.tolist()):
                    key = f"{name[:-len('gate')]}experts.{k}"
                    counts[key] = counts.get(key, 0) + c
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return counts


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_gptq_counts_the_tokens_routed_to_each_expert(tmp_path, family):
    one, _ = tiny_one_and_streamed(family, tmp_path)
    expected = _route_counts(one, _calibration())
    report = _gptq(one, fp_inputs=True)  # Hessians of the full-precision model's inputs
    moe = report.extra["moe"]
    assert moe["tokens"] == expected and moe["rtn_fallback"] == []
    assert sum(expected.values()) == 2 * 4 * 32 * 2  # blocks * tokens * experts per token
    for layer in report.layers:  # every matrix of an expert: its expert's tokens
        expert = layer["name"].rsplit(".", 1)[0]
        if expert in expected:
            assert layer["hessian_tokens"] == expected[expert]


def _never_route_to_expert_3(model) -> None:
    """Block 0's router (top 2 of 4) picks another expert wherever it picked expert 3."""

    def hook(mod, args, out):
        idx = out[2]
        other = idx.sum(-1, keepdim=True) - 3  # the row's other expert, where 3 is chosen
        return out[0], out[1], torch.where(idx == 3, (other == 0).long(), idx)

    model.model.layers[0].mlp.gate.register_forward_hook(hook)


def test_an_expert_without_calibration_tokens_falls_back_to_rtn(tmp_path):
    one, streamed = tiny_one_and_streamed("mixtral", tmp_path)
    for model in (one, streamed):
        _never_route_to_expert_3(model)
    name = "model.layers.0.mlp.experts.3"
    original = {m: one.get_submodule(f"{name}.{m}").weight.clone()
                for m in ("gate_proj", "up_proj", "down_proj")}
    report, other = _gptq(one), _gptq(streamed)
    fmt = get_format(FMT)
    for m, w in original.items():
        entry = next(x for x in report.layers if x["name"] == f"{name}.{m}")
        assert entry["fallback"] == "rtn" and entry["fallback_reason"] == NO_TOKENS
        assert entry["hessian_tokens"] == 0
        assert torch.equal(one.get_submodule(f"{name}.{m}").weight, fmt.fake_quantize(w))
    assert report.extra["moe"]["rtn_fallback"] == [name]
    # block 1 routes tokens to expert 3: its gate and up share one Hessian, grouped like the
    # siblings that block 0's first batch reached
    later = {x["name"]: x for x in report.layers if ".layers.1.mlp.experts.3." in x["name"]}
    gate = "model.layers.1.mlp.experts.3.gate_proj"
    assert later[gate.replace("gate", "up")]["hessian_of"] == gate == later[gate]["hessian_of"]
    assert later[gate]["hessian_tokens"] > 0 and "fallback" not in later[gate]
    assert report.extra["moe"]["tokens"][name] == 0 and report.extra["gptq"] is not None
    assert report.extra["rtn_fallback"] == 3
    sa, sb = one.state_dict(), streamed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and other.extra["moe"] == report.extra["moe"]


def test_an_unrouted_expert_with_the_hessian_cache(tmp_path):
    """fp_inputs + cache: the reached experts' Hessians are cached, the unreached expert has
    none to cache (a miss again, RTN again); the second run gives the same weights."""
    model, _ = tiny_one_and_streamed("mixtral", tmp_path / "m")
    _never_route_to_expert_3(model)
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        report = quantize(m, GPTQConfig(format=FMT, device="cpu", fp_inputs=True),
                          QuantContext(calibration=_calibration(), cache_dir=str(tmp_path / "c")))
        runs.append((m.state_dict(), report))
    (first, a), (second, b) = runs
    assert all(torch.equal(first[k], second[k]) for k in first)
    status = {x["name"]: x["hessian_cache"] for x in b.layers}
    assert status["model.layers.0.mlp.experts.3.gate_proj"] == "miss"
    assert status["model.layers.0.mlp.experts.2.gate_proj"] == "hit"
    assert a.extra["moe"]["rtn_fallback"] == b.extra["moe"]["rtn_fallback"] == [
        "model.layers.0.mlp.experts.3"]


def test_expert_weights_count_in_the_quantized_bytes(tmp_path):
    one, _ = tiny_one_and_streamed("qwen2_moe", tmp_path)
    anat = get_anatomy(one)
    counts = count_parameters(one, anat)
    config = one.config
    h, moe, shared = config.hidden_size, config.moe_intermediate_size, \
        config.shared_expert_intermediate_size
    attention = sum(one.get_submodule(f"model.layers.0.self_attn.{p}").weight.numel()
                    for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    per_block = attention + 3 * h * shared + config.num_experts * 3 * h * moe
    assert counts["quantizable"] == 2 * per_block  # routers (mlp.gate, shared_expert_gate) not
    report = quantize(one, RTNConfig(format=FMT))
    assert report.quantized_numel == counts["quantizable"]  # model_bytes counts these at 4.5 bits
    # what stays at 16 bits in the blocks: routers (mlp.gate, shared_expert_gate), two norms,
    # the q/k/v biases
    routers, norms, biases = config.num_experts * h + h, 2 * h, 32 + 16 + 16
    assert counts["blocks"] - counts["quantizable"] == 2 * (routers + norms + biases)


def test_fused_experts_are_refused_until_split():
    import transformers as T

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS["mixtral"]()).eval()
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(UnsupportedArchitectureError, match="split_experts"):
            get_anatomy(model)
        assert split_experts(model) == 2  # one fused module per block
        torch.testing.assert_close(model(ids).logits, before)
    assert len(get_anatomy(model).experts) == 8
    assert copy.deepcopy(model).model.layers[1].mlp.experts[3].down_proj.weight.shape == (32, 64)


def test_sibling_experts_share_a_true_sequential_pass(tmp_path):
    """Mixtral block: q/k/v, o, every expert's gate/up, every down: 4 passes (not 2 + 2 x 4)."""
    one, _ = tiny_one_and_streamed("mixtral", tmp_path)
    calls = []
    one.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: calls.append(1))
    _gptq(one)
    # the anatomy's call-order probe, the input groups' probe, 4 passes, the block's outputs
    assert len(calls) == 1 + 1 + 4 + 1


@pytest.mark.gpu
@pytest.mark.parametrize("family", NEW)
def test_gptq_on_cuda_streamed_agrees_with_one_piece(tmp_path, family):
    """On the GPU (Triton column sweep where it applies), streamed and in one piece."""
    from tiny_models import save_tiny

    from ptqscale.models import ModelConfig, load_model

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    save_tiny(family, tmp_path)
    models = [load_model(ModelConfig(name=family, path=str(tmp_path), device="cuda",
                                     placement=p))[0] for p in ("one", "streamed")]
    ids = _calibration()
    reports = [quantize(m, GPTQConfig(format=FMT, device="cuda"), QuantContext(calibration=ids))
               for m in models]
    assert all(p.device.type == "cpu" for p in models[1].parameters())
    assert reports[0].extra["out_err_gptq"] < reports[0].extra["out_err_rtn"]
    stream = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(2))
    ev = EvalConfig(seqlen=64, batch_size=2)
    nll = [measure_perplexity(m, stream, ev).nll for m in models]
    assert abs(nll[0] - nll[1]) <= 1e-3 * abs(nll[0])


def test_blocks_of_different_structure_are_refused():
    import transformers as T

    config = T.Qwen2MoeConfig(**{**TINY_CONFIGS["qwen2_moe"]().to_dict(), "mlp_only_layers": [1]})
    model = T.AutoModelForCausalLM.from_config(config).eval()
    split_experts(model)
    with pytest.raises(UnsupportedArchitectureError, match="block 1 lacks"):
        get_anatomy(model)


@pytest.mark.slow
def test_a_gptq_job_on_a_moe_stand_in_records_its_experts(tmp_path):
    """Through the runner: the record's expert token counts and bytes (experts at 4.5 bits)."""
    from ptqscale.runner.config import register_configs
    from ptqscale.runner.job import run_job
    from ptqscale.runner.planner import compose, hydra_context

    register_configs()
    with hydra_context():
        record = run_job(compose(overrides=[
            "model=mixtral-8x7b", "model.stand_in=true", "model.device=cpu",
            "model.dtype=float32", "method=gptq", "method.device=cpu", "format=int4_g32",
            "calib.nsamples=4", "calib.seqlen=64", "eval.max_tokens=1024", "eval.seqlen=128",
            "progress=false", "wandb.mode=disabled", f"paths.results={tmp_path}"]))
    assert record["status"] == "complete"
    moe = record["quantization"]["moe"]
    assert moe["experts"] == 16 and moe["rtn_fallback"] == []
    assert sum(moe["tokens"].values()) == 2 * 4 * 64 * 2  # blocks * tokens * experts per token
    params = record["params"]
    attention = 2 * 64 * 64 + 2 * 32 * 64  # q, o (64 x 64); k, v (32 x 64: 2 kv heads)
    assert params["quantizable"] == 2 * (attention + 8 * 3 * 64 * 64)  # every expert matrix
    assert record["metrics"]["model_bytes"] == round(
        params["quantizable"] * 4.5 / 8 + (params["total"] - params["quantizable"]) * 2)
