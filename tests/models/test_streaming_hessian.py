"""Streamed Hessian features (forward-over-reverse, one block at a time) equal the one-piece ones.

The streamed HVP is exact, as the one-piece double backward is, and on CPU it is the same
arithmetic: every block's products come from the same derivative formulas applied to the
same values, and the micro-batches are weighted and summed with the same operations in the
same order. So the products, the trace samples and the power iteration are bitwise equal.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from tiny_models import (
    TINY_CONFIGS,
    one_and_streamed,
    real_model_paths,
    tiny_one_and_streamed,
)

from ptqscale.data import DataConfig, tokenize_corpus
from ptqscale.errors import ConfigError
from ptqscale.metrics import hessian as hs
from ptqscale.metrics.hessian_streamed import StreamedHVP
from ptqscale.metrics.landscape import (
    LandscapeConfig,
    _batch_hvps,
    measure_hessian,
    measure_landscape,
)
from ptqscale.models import ModelConfig, get_anatomy

PATHS = real_model_paths()


@pytest.fixture(scope="module", params=["stories260k", "gutenberg-llama-200k"])
def models(request):
    """The model in one piece and streamed (CPU), and 6 windows of 64 tokens of real text."""
    one, streamed, tok = one_and_streamed(PATHS[request.param])
    stream = tokenize_corpus(DataConfig("tinystories", "validation", path=PATHS["tinystories"],
                                        max_documents=50), tok, None, preset="gptq")
    return one, streamed, stream[:384].view(6, 64)


def _targets(model):
    return dict(get_anatomy(model).targets)


def _assert_same_products(one, streamed, windows, hvp_windows, v_seed=3):
    cfg = LandscapeConfig(max_tokens=10**6, hvp_windows=hvp_windows)
    t1, t2 = _targets(one), _targets(streamed)
    w1, w2 = [m.weight for m in t1.values()], [m.weight for m in t2.values()]
    with hs.fp32(one), hs.double_backward_ready(one, w1):
        v = hs.rademacher(w1, v_seed)
        expect = hs.summed_hvp(_batch_hvps(one, windows, w1, None, cfg, False), w1)(v)
    with hs.fp32(streamed), hs.double_backward_ready(streamed, w2):
        got = StreamedHVP(streamed, t2, windows, hvp_windows)(v)
    assert max(float(e.abs().max()) for e in expect) > 1e-2  # not a vacuous zero Hessian
    for g, e in zip(got, expect, strict=True):
        assert g.device.type == "cpu" and g.grad_fn is None
        assert torch.equal(g, e)


@pytest.mark.parametrize("hvp_windows", [2, 4])  # 2: weights 1/3; 4: a short last one
def test_streamed_hvp_is_the_one_piece_hvp(models, hvp_windows):
    one, streamed, windows = models
    _assert_same_products(one, streamed, windows, hvp_windows)


def test_a_head_in_spans_gives_the_same_products(models, monkeypatch):
    """The head's double backward over spans of positions (as a 128k vocabulary needs) is
    bitwise the whole window's: the head acts per position, the loss gradients are the mean's."""
    import ptqscale.metrics.hessian_streamed as hst

    one, streamed, windows = models
    vocab = one.config.vocab_size
    monkeypatch.setattr(hst, "HEAD_CHUNK_FLOATS", 2 * 11 * vocab)  # spans of 11: a short last
    assert len(hst.head_spans(windows[:2].shape, vocab)) == 6
    _assert_same_products(one, streamed, windows, hvp_windows=2)


def test_streamed_hessian_features_match_the_one_piece_ones(models):
    one, streamed, windows = models
    cfg = LandscapeConfig(enabled=True, levels_db=[30.0, 20.0], seeds=1, max_tokens=384,
                          hutchinson_probes=3, power_iters=4, power_tol=0.0, hvp_windows=3)
    before = {k: v.clone() for k, v in streamed.state_dict().items()}
    a = measure_landscape(one, _targets(one), windows, cfg)
    b = measure_landscape(streamed, _targets(streamed), windows, cfg)
    assert all(torch.equal(before[k], v) for k, v in streamed.state_dict().items())
    assert all(p.device.type == "cpu" for p in streamed.parameters())
    assert a["hessian_trace"] > 0 and a["top_eigenvalue"] > 0
    assert b["power_iters_run"] == a["power_iters_run"] == 4

    def numbers(d):
        return {k: v for k, v in d.items() if not k.startswith("cost_")}

    assert numbers(a) == numbers(b)  # every feature and per-layer trace, bitwise
    # a probe is a forward and a recomputing backward sweep; each power step the same
    assert b["cost_hessian_trace_tokens"] == 2 * 3 * windows.numel()
    assert b["cost_top_eigenvalue_tokens"] == 2 * 4 * windows.numel()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_streams_its_hvp(tmp_path, family):
    """Forward-mode tangents and the replayed head suit every family's block and head."""
    one, streamed = tiny_one_and_streamed(family, tmp_path)
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    _assert_same_products(one, streamed, windows, hvp_windows=2)


def test_streamed_hessian_refuses_what_it_cannot_stream(models):
    _, streamed, windows = models
    with pytest.raises(ConfigError, match=r"landscape.hvp='finite_difference' does not stream"):
        measure_hessian(streamed, _targets(streamed), windows,
                        LandscapeConfig(hvp="finite_difference", max_tokens=384))
    head = {"lm_head": streamed.get_output_embeddings()}
    with pytest.raises(ValueError, match="target 'lm_head' is outside the decoder blocks"):
        measure_hessian(streamed, head, windows, LandscapeConfig(max_tokens=384))


def _random_llama(layers: int = 12, seqlen: int = 64):
    """A random Llama of blocks of 1M weights each (small vocabulary: the blocks dominate its
    weights, 3.9 MB of fp32 per block), and 4 windows of ``seqlen`` tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return model, torch.randint(0, 512, (4, seqlen), generator=torch.Generator().manual_seed(1))


def _one_and_streamed_hessian(device: str, budget: str | None, **shape):
    """Hessian features of the random Llama in one piece and streamed on ``device``, and the
    streamed run's peak allocated device memory (None on a CPU)."""
    from ptqscale.models import place_model
    from ptqscale.models.streaming import apply_memory_budget

    one, windows = _random_llama(**shape)
    streamed = copy.deepcopy(one)
    cfg = LandscapeConfig(enabled=True, max_tokens=windows.numel(), hutchinson_probes=2, power_iters=3,
                          power_tol=0.0, hvp_windows=2)
    place_model(one, ModelConfig(name="r", path="random", device=device))
    a = measure_hessian(one, _targets(one), windows, cfg)
    del one  # off the device before the streamed run's peak is measured
    gc.collect()
    cuda = device == "cuda"
    try:
        place_model(streamed, ModelConfig(name="r", path="random", device=device,
                                          placement="streamed", max_gpu_memory=budget))
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        b = measure_hessian(streamed, _targets(streamed), windows, cfg)
        peak = torch.cuda.max_memory_allocated() if cuda else None
    finally:
        apply_memory_budget(torch.device(device), None)  # later tests: no cap
    assert all(p.device.type == "cpu" for p in streamed.parameters())
    return a, b, peak, streamed, windows


def test_a_deeper_random_llama_streams_its_hessian_on_cpu():
    a, b, *_ = _one_and_streamed_hessian("cpu", None)
    for key in ("hessian_trace", "kappa_h", "top_eigenvalue"):
        assert a[key] == b[key], key


@pytest.mark.gpu
def test_streamed_hessian_on_cuda_agrees():
    a, b, _, _, _ = _one_and_streamed_hessian("cuda", "1GiB", layers=24, seqlen=32)
    for key in ("hessian_trace", "kappa_h", "top_eigenvalue"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key  # same probes on the device


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, reason="H200, 2026-12-04: the streamed peak was 92 MB against "
                   "this 31 MB bound (the model is 94 MB); what holds it is not yet found")
def test_streamed_hessian_on_cuda_holds_one_block():
    _, _, peak, model, windows = _one_and_streamed_hessian("cuda", "1GiB", layers=24, seqlen=32)
    # one block's weights, probe and gradient or product (3 block-sized vectors, 4 for
    # slack), the checkpoints (x_i and dx_i of every block, on the device here) and 8 MiB
    # for one block's graph and the head step; far below the model's 94 MB
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    checkpoints = 2 * (len(model.model.layers) + 2) * windows.numel() * 256 * 4
    bound = 4 * block + checkpoints + 8 * 2**20
    assert bound < 0.4 * sum(p.numel() * 4 for p in model.parameters())
    assert peak < bound, (peak, bound)


@pytest.mark.gpu
def test_streamed_noise_response_on_cuda_draws_the_one_piece_noise():
    """Noise drawn on the execution device: the same directions as in one piece there."""
    from ptqscale.metrics.landscape import measure_noise_response
    from ptqscale.models import place_model

    one, windows = _random_llama()
    streamed = copy.deepcopy(one)
    place_model(one, ModelConfig(name="r", path="random", device="cuda"))
    place_model(streamed, ModelConfig(name="r", path="random", device="cuda",
                                      placement="streamed"))
    cfg = LandscapeConfig(enabled=True, levels_db=[20.0, 10.0], seeds=2, max_tokens=256,
                          hessian=False)
    a = measure_noise_response(one, _targets(one), windows, cfg)
    b = measure_noise_response(streamed, _targets(streamed), windows, cfg)
    assert abs(a["dnll_at_10db"]) > 1e-3  # a visible response (of either sign), not rounding
    for key in ("nll_clean", "dnll_at_20db", "dnll_at_10db"):
        assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
