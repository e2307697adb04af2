"""Streamed models give the numbers of models in one piece; placement config and budget.

On CPU the execution device is the CPU too, but a streamed model takes the other code path
(all windows through block i, then block i+1, the head by replay), so equal NLLs here show
that the walk does the same arithmetic as the model's own forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import (
    TINY_CONFIGS,
    one_and_streamed,
    real_model_paths,
    save_tiny,
    tiny_one_and_streamed,
)

from ptqscale.data import CalibConfig, DataConfig, sample_calibration, tokenize_corpus
from ptqscale.errors import ConfigError
from ptqscale.methods import GPTQConfig, QuantContext, RTNConfig, quantize
from ptqscale.metrics import EvalConfig, LandscapeConfig, measure_perplexity
from ptqscale.metrics.landscape import (
    mean_nll,
    measure_directional_profile,
    measure_noise_response,
)
from ptqscale.models import (
    GPUMemoryBudgetError,
    ModelConfig,
    Placement,
    get_anatomy,
    load_model,
    placement_of,
    walk_logits,
)
from ptqscale.models.config import checkpoint_dtype
from ptqscale.models.streaming import choose_streamed, onloaded, within_budget
from ptqscale.runner import keys

PATHS = real_model_paths()
STORIES, GUTENBERG, TINYSTORIES = PATHS["stories260k"], PATHS["gutenberg-llama-200k"], \
    PATHS["tinystories"]
_both = one_and_streamed


@pytest.fixture(scope="module", params=["stories260k", "gutenberg-llama-200k"])
def models(request):
    path = STORIES if request.param == "stories260k" else GUTENBERG
    one, streamed, tok = _both(path)
    stream = tokenize_corpus(DataConfig("tinystories", "validation", path=TINYSTORIES,
                                        max_documents=200), tok, None, preset="gptq")
    return one, streamed, tok, stream[:3000]


def test_placement_is_recorded_and_weights_stay_put(models):
    one, streamed, _, _ = models
    assert placement_of(one) == Placement(False, torch.device("cpu"))
    assert placement_of(streamed).streamed
    assert all(p.device.type == "cpu" for p in streamed.parameters())


@pytest.mark.parametrize("ev", [EvalConfig(seqlen=256, batch_size=3),
                                EvalConfig(preset="rolling", seqlen=256, stride=96, batch_size=4)],
                         ids=["gptq", "rolling"])
def test_streamed_perplexity_is_bitwise_the_one_piece_one(models, ev):
    one, streamed, _, stream = models
    a, b = measure_perplexity(one, stream, ev), measure_perplexity(streamed, stream, ev)
    assert a.tokens == b.tokens and a.windows == b.windows > 3  # several batches
    assert a.nll_sum == b.nll_sum  # the same arithmetic: bitwise


def test_streamed_walk_leaves_the_weights_unchanged(models):
    _, streamed, _, stream = models
    before = {k: v.clone() for k, v in streamed.state_dict().items()}
    list(walk_logits(streamed, [stream[:512].view(2, 256)]))
    after = streamed.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_streamed_noise_response_is_the_one_piece_one(models):
    one, streamed, _, stream = models
    windows = stream[:1024].view(4, 256)
    assert mean_nll(one, windows, 3) == mean_nll(streamed, windows, 3)
    cfg = LandscapeConfig(enabled=True, levels_db=[20.0, 30.0], seeds=1, max_tokens=1024,
                          batch_size=2, hessian=False)
    a = measure_noise_response(one, dict(get_anatomy(one).targets), windows, cfg)
    b = measure_noise_response(streamed, dict(get_anatomy(streamed).targets), windows, cfg)
    def numbers(d):
        return {k: v for k, v in d.items() if not k.startswith("cost_")}

    assert numbers(a) == numbers(b) and len(numbers(a)) > 4


def test_streamed_noise_and_directional_perturb_on_the_device_only(models, monkeypatch):
    """Perturbed block by block as each is onloaded: the one-piece numbers, bitwise, and the
    weights waiting on the CPU are never written (no reference copy restores them); one walk
    per seed serves the clean pass and every level and sign (the weights move once)."""
    import ptqscale.models.streaming as streaming

    one, streamed, _, stream = models
    onloads = []
    real = streaming.onloaded
    monkeypatch.setattr(streaming, "onloaded", lambda *a, **k: onloads.append(1) or real(*a, **k))
    list(walk_logits(streamed, [stream[:512].view(2, 256)]))
    per_walk, onloads[:] = len(onloads), []
    windows = stream[:768].view(3, 256)
    targets = dict(get_anatomy(streamed).targets)
    before = {k: v.clone() for k, v in streamed.state_dict().items()}
    writes = [m.weight._version for m in targets.values()]  # bumped by any in-place write
    cfg = LandscapeConfig(enabled=True, levels_db=[25.0, 15.0], seeds=2, max_tokens=768,
                          batch_size=2, hessian=False)
    a = measure_noise_response(one, dict(get_anatomy(one).targets), windows, cfg)
    b = measure_noise_response(streamed, targets, windows, cfg)
    assert len(onloads) == cfg.seeds * per_walk
    assert {k: v for k, v in a.items() if not k.startswith("cost_")} == \
        {k: v for k, v in b.items() if not k.startswith("cost_")}
    assert a["dnll_at_15db"] != 0

    def rtn(w):  # int4 per row, symmetric
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 7
        return (w / scale).round().clamp(-8, 7) * scale

    ts = (0.5, 1.0)
    c = measure_directional_profile(one, dict(get_anatomy(one).targets), windows, rtn, ts,
                                    batch_size=2)
    onloads[:] = []
    d = measure_directional_profile(streamed, targets, windows, rtn, ts, batch_size=2)
    assert len(onloads) == per_walk
    assert {k: v for k, v in c.items() if not k.startswith("cost_")} == \
        {k: v for k, v in d.items() if not k.startswith("cost_")}
    assert c["directional_dnll_at_t1"] > 0 and c["directional_sqnr_db"] > 0
    assert [m.weight._version for m in targets.values()] == writes
    after = streamed.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
               for k in before)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_walks_block_by_block(tmp_path, family):
    """The replay of the final hidden states suits every family's block outputs and head."""
    one, streamed = tiny_one_and_streamed(family, tmp_path)
    ids = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    batches = list(ids.split(2))
    with torch.no_grad():
        expected = [one(input_ids=b, use_cache=False).logits for b in batches]
    got = dict(walk_logits(streamed, batches))
    for i, logits in enumerate(expected):
        torch.testing.assert_close(got[i], logits, rtol=0, atol=0)


def test_methods_quantize_streamed_models_to_the_same_weights():
    one, streamed, tok = _both(GUTENBERG)
    calib = DataConfig("tinystories", "validation", path=TINYSTORIES, max_documents=200)
    ids, digest = sample_calibration(CalibConfig(calib, nsamples=4, seqlen=128, seed=0), tok, None)
    stream = tokenize_corpus(calib, tok, None, preset="gptq")[:2048]
    for method in (RTNConfig(format="int4_g32"), GPTQConfig(format="int4_g32", device="cpu")):
        a, b = copy.deepcopy(one), copy.deepcopy(streamed)
        quantize(a, method, QuantContext(calibration=ids, calibration_hash=digest))
        quantize(b, method, QuantContext(calibration=ids, calibration_hash=digest))
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), method.name
        ev = EvalConfig(seqlen=256, batch_size=4)
        assert measure_perplexity(a, stream, ev).nll_sum == measure_perplexity(b, stream, ev).nll_sum


# ------------------------------------------------------------------ config, keys, budget


def test_placement_and_budget_are_validated():
    with pytest.raises(ConfigError, match="placement"):
        ModelConfig(name="m", path="gpt2", placement="sharded")
    for bad in ("20", "20GB", "-1GiB", "0MiB", "lots"):
        with pytest.raises(ConfigError, match=r"model.max_gpu_memory=.*GiB or MiB"):
            ModelConfig(name="m", path="gpt2", max_gpu_memory=bad)
    ModelConfig(name="m", path="gpt2", max_gpu_memory="1.5GiB", placement="auto")
    with pytest.raises(ConfigError, match="dtype"):
        ModelConfig(name="m", path="gpt2", dtype="float64")


def test_dtype_auto_is_the_checkpoints_and_keys_as_it():
    assert checkpoint_dtype(GUTENBERG) == "bfloat16"  # the zoo stores bf16 safetensors
    assert checkpoint_dtype(STORIES) == "float32"  # transformers dequantizes GGUF to fp32
    model, _ = load_model(ModelConfig(name="g", path=GUTENBERG, device="cpu", dtype="auto"))
    assert next(model.parameters()).dtype == torch.bfloat16
    base = dict(name="g", path=GUTENBERG)
    assert (keys.model_identity(ModelConfig(**base, dtype="auto"))
            == keys.model_identity(ModelConfig(**base, dtype="bfloat16")))
    assert (keys.model_identity(ModelConfig(**base, placement="streamed", max_gpu_memory="4GiB"))
            == keys.model_identity(ModelConfig(**base)))


def test_auto_streams_only_what_does_not_fit():
    cuda = torch.device("cuda")  # a device object only: the budget decides, no CUDA call
    gib = 2**30
    assert not choose_streamed("auto", 1 * gib, cuda, budget=8 * gib)
    assert choose_streamed("auto", 8 * gib, cuda, budget=8 * gib)
    assert not choose_streamed("auto", 100 * gib, torch.device("cpu"), budget=None)
    assert choose_streamed("streamed", 1, torch.device("cpu"), budget=None)
    assert not choose_streamed("one", 100 * gib, cuda, budget=gib)


def test_out_of_memory_under_a_budget_names_the_budget():
    placement = Placement(True, torch.device("cpu"), budget=2**30)
    with pytest.raises(GPUMemoryBudgetError, match=r"perplexity needed more than model.max_gpu_memory=1.00 GiB"):
        with within_budget(placement, "perplexity"):
            raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.OutOfMemoryError):  # no budget: torch's own error
        with within_budget(Placement(True, torch.device("cpu")), "perplexity"):
            raise torch.OutOfMemoryError("CUDA out of memory")


@pytest.mark.gpu
def test_onloaded_restores_the_originals_or_writes_back():
    cuda = torch.device("cuda")
    t = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    home = t.data.data_ptr()
    with onloaded([t], cuda, write_back=False):
        assert t.device.type == "cuda"
        t.data.add_(1)
    # forward-only: the untouched original storage (``.data`` is a new object on every access)
    assert t.data.data_ptr() == home and not t.data.any()
    with onloaded([t], cuda):
        t.data.add_(1)
    assert t.device.type == "cpu" and bool((t.data == 1).all())  # a method's change kept


def test_stem_and_head_onload_only_what_they_need(tmp_path):
    """Untied 128k-vocabulary models: the stem leaves the output layer, the head the input
    embedding where they wait (a GB each); a tied model's head takes the stem along."""
    from ptqscale.models.streaming import _head_tensors, outside_blocks

    save_tiny("llama", tmp_path)
    model, _ = load_model(ModelConfig(name="l", path=str(tmp_path), device="cpu"))
    assert not model.config.tie_word_embeddings
    ids = torch.zeros(1, 4, dtype=torch.long)
    head = {id(t) for t in _head_tensors(model, "model.layers", model.model.layers[0], ids)}
    assert head == {id(model.model.norm.weight), id(model.lm_head.weight)}
    stem = {id(t) for t in outside_blocks(model, "model.layers", "stem")}
    assert id(model.model.embed_tokens.weight) in stem and id(model.lm_head.weight) not in stem
    model.lm_head.weight = model.model.embed_tokens.weight  # tied
    head = {id(t) for t in _head_tensors(model, "model.layers", model.model.layers[0], ids)}
    assert id(model.model.embed_tokens.weight) in head and id(model.model.norm.weight) in head


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_streams_to_cuda(tmp_path, family):
    save_tiny(family, tmp_path)
    one, _ = load_model(ModelConfig(name=family, path=str(tmp_path), device="cuda"))
    streamed, _ = load_model(ModelConfig(name=family, path=str(tmp_path), device="cuda",
                                         placement="streamed"))
    ids = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    batches = list(ids.split(2))
    with torch.no_grad():
        expected = [one(input_ids=b.cuda(), use_cache=False).logits for b in batches]
    got = dict(walk_logits(streamed, batches))
    # on the CPU, pinned (a small model: page-locked copies move several times faster)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in streamed.parameters())
    for i, logits in enumerate(expected):
        assert got[i].device.type == "cuda"
        torch.testing.assert_close(got[i], logits, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_streamed_on_cuda_keeps_weights_on_the_cpu_and_agrees():
    one, tok = load_model(ModelConfig(name="g", path=GUTENBERG, device="cuda", max_seqlen=512))
    streamed, _ = load_model(ModelConfig(name="g", path=GUTENBERG, device="cuda", max_seqlen=512,
                                         placement="streamed", max_gpu_memory="1GiB"))
    stream = torch.randint(0, one.config.vocab_size, (4096,),
                           generator=torch.Generator().manual_seed(0))
    ev = EvalConfig(seqlen=512, batch_size=2)
    a, b = measure_perplexity(one, stream, ev), measure_perplexity(streamed, stream, ev)
    assert all(p.device.type == "cpu" for p in streamed.parameters())
    assert abs(a.nll - b.nll) < 1e-5 * a.nll
    calib = stream[:1024].view(4, 256)
    for method in (RTNConfig(format="int4_g32"), GPTQConfig(format="int4_g32", device="cuda")):
        qa, qb = copy.deepcopy(one), copy.deepcopy(streamed)
        quantize(qa, method, QuantContext(calibration=calib, calibration_hash="x"))
        quantize(qb, method, QuantContext(calibration=calib, calibration_hash="x"))
        sa, sb = qa.state_dict(), qb.state_dict()
        assert all(sb[k].device.type == "cpu" for k in sb)
        for k in sa:  # the same grid: at most a rare one-step flip from rounding
            assert (sa[k].cpu() != sb[k]).float().mean() < 1e-3, (method.name, k)
