"""Perplexity invariants, checked against independent per-token computations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from torch import nn

from ptqscale.errors import ConfigError
from ptqscale.metrics import PROTOCOL_VERSION, EvalConfig, measure_perplexity, window_plan
from ptqscale.metrics.nll import standard_errors
from ptqscale.metrics.perplexity import window_se

VOCAB = 96


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on 2 shared cores: one thread is fastest
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                        max_position_embeddings=128)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, VOCAB, (1000,), generator=torch.Generator().manual_seed(1))


def _per_token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Independent reference: log_softmax + gather on one window, in float64."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0].double()
    return -torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).squeeze(1)


def test_gptq_sum_equals_independent_per_token_losses(model, stream):
    res = measure_perplexity(model, stream, EvalConfig(seqlen=64, batch_size=4))
    windows = 1000 // 64
    assert (res.windows, res.tokens) == (windows, windows * 63)
    ref = sum(_per_token_nll(model, stream[i * 64:(i + 1) * 64]).sum() for i in range(windows))
    assert res.nll_sum == pytest.approx(float(ref), rel=1e-6)
    # and the model's own loss (mean over 63 shifted tokens per window)
    with torch.no_grad():
        own = sum(model(w[None], labels=w[None]).loss.double() * 63
                  for w in stream[:windows * 64].view(windows, 64))
    assert res.nll_sum == pytest.approx(float(own), rel=1e-6)
    assert res.nll == pytest.approx(res.nll_sum / res.tokens, rel=1e-15)
    assert res.perplexity == pytest.approx(math.exp(res.nll), rel=1e-12)
    assert res.protocol_version == PROTOCOL_VERSION == 1
    assert res.to_dict()["preset"] == "gptq" and res.to_dict()["stride"] == 64


class _EqualLogits(nn.Module):
    """A 'causal LM' whose logits are all zero: every token has probability 1/vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


@pytest.mark.parametrize("vocab", [2, 512, 50257])
def test_equal_logits_give_log_vocab(vocab):
    ids = torch.randint(0, vocab, (300,), generator=torch.Generator().manual_seed(0))
    for cfg in (EvalConfig(seqlen=32, batch_size=3), EvalConfig("rolling", 32, stride=7)):
        res = measure_perplexity(_EqualLogits(vocab), ids, cfg)
        # log-softmax of zeros in fp32 is the fp32 rounding of ln(V), averaged in float64
        assert res.nll == float(torch.tensor(math.log(vocab), dtype=torch.float32))
        assert res.nll == pytest.approx(math.log(vocab), rel=1e-7)


def test_rolling_scores_every_token_once_with_its_context(model, stream):
    cfg = EvalConfig("rolling", seqlen=64, stride=24, batch_size=5)
    res = measure_perplexity(model, stream, cfg)
    assert res.tokens == 999 and res.stride == 24
    # independent loop: token t is scored in the window that ends at the first window end > t
    ref, scored, end = 0.0, 1, 0
    while end < 1000:
        end = min(end + 24, 1000) if end else 64
        start = end - 64
        nll = _per_token_nll(model, stream[start:end])  # predicts positions start+1 .. end-1
        ref += float(nll[scored - start - 1:].sum())
        scored = end
    assert res.nll_sum == pytest.approx(ref, rel=1e-6)
    plan = window_plan(1000, cfg)
    assert plan[0] == (0, 1) and plan[-1][0] == 1000 - 64 and res.windows == len(plan)


def test_rolling_scores_all_but_the_first_token_gptq_drops_one_per_window(model, stream):
    ids = stream[:640]
    gptq = measure_perplexity(model, ids, EvalConfig(seqlen=64))
    roll = measure_perplexity(model, ids, EvalConfig("rolling", seqlen=64, stride=63))
    assert roll.tokens == 639 > gptq.tokens == 630


def test_bitwise_deterministic_and_batch_size_independent(model, stream):
    a = measure_perplexity(model, stream, EvalConfig(seqlen=64, batch_size=4))
    b = measure_perplexity(model, stream, EvalConfig(seqlen=64, batch_size=4))
    assert a.to_dict() == b.to_dict()
    c = measure_perplexity(model, stream, EvalConfig(seqlen=64, batch_size=1))
    assert c.nll == pytest.approx(a.nll, rel=1e-6)


def test_token_budget(model, stream):
    res = measure_perplexity(model, stream, EvalConfig(seqlen=64, max_tokens=200))
    assert (res.windows, res.tokens) == (3, 3 * 63)
    full = measure_perplexity(model, stream[:192], EvalConfig(seqlen=64))
    assert res.to_dict() == full.to_dict()


def test_bf16_weights_score_in_fp32(model, stream):
    bf16 = T.AutoModelForCausalLM.from_config(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16)
    lo = measure_perplexity(bf16, stream, EvalConfig(seqlen=64))
    hi = measure_perplexity(model, stream, EvalConfig(seqlen=64))
    assert isinstance(lo.nll, float) and lo.nll == pytest.approx(hi.nll, rel=2e-2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seqlen=1), "seqlen=1 must be >= 2"),
    (dict(preset="lm-eval"), "preset='lm-eval' unknown"),
    (dict(stride=16), "stride applies to the rolling preset only"),
    (dict(preset="rolling", seqlen=64, stride=64), r"stride=64 must be in \[1, seqlen - 1\]"),
    (dict(seqlen=64, max_tokens=10), "max_tokens=10 must be >= seqlen"),
    (dict(batch_size=0), "batch_size=0"),
])
def test_bad_eval_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EvalConfig(**kwargs)


def test_bad_inputs_fail_before_any_forward(model, stream):
    with pytest.raises(ConfigError, match="seqlen=256 exceeds the model's context 128"):
        measure_perplexity(model, stream, EvalConfig(seqlen=256))
    with pytest.raises(ConfigError, match="fewer than eval.seqlen=64"):
        measure_perplexity(model, stream[:50], EvalConfig(seqlen=64))
    with pytest.raises(ConfigError, match="vocab has 96"):
        measure_perplexity(model, stream + 96, EvalConfig(seqlen=64))
    with pytest.raises(ConfigError, match="1-D integer tensor"):
        measure_perplexity(model, stream.float(), EvalConfig(seqlen=64))


def test_the_loss_in_row_chunks_equals_one_call(model, stream, monkeypatch):
    """Big vocabularies are scored a few rows at a time (bounded fp32 logits): same values."""
    from ptqscale.metrics import perplexity

    cfg = EvalConfig(seqlen=64, batch_size=4)
    whole = measure_perplexity(model, stream, cfg)
    monkeypatch.setattr(perplexity, "LOSS_CHUNK_FLOATS", 7 * model.config.vocab_size)
    chunked = measure_perplexity(model, stream, cfg)
    assert chunked.nll_sum == whole.nll_sum and chunked.tokens == whole.tokens


def test_window_sums_are_the_windows_own_losses(model, stream):
    res = measure_perplexity(model, stream, EvalConfig(seqlen=64, batch_size=4))
    ref = [float(_per_token_nll(model, stream[i * 64:(i + 1) * 64]).sum())
           for i in range(res.windows)]
    assert res.window_nll == pytest.approx(ref, rel=1e-6)
    assert res.window_tokens == [63] * res.windows and math.fsum(res.window_nll) == res.nll_sum


def test_standard_errors_match_the_spread_over_fresh_corpora(model):
    """The SE of one corpus predicts how NLL and dNLL move on another corpus of the same size:
    40 draws of 16 windows, each measured on the model and on a perturbed copy of it. (That
    the pairing brings dNLL's SE below NLL's shows on a trained model: test_jobs.py.)"""
    noisy = T.AutoModelForCausalLM.from_config(model.config).eval()
    noisy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for w in noisy.parameters():
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel())) * 0.05)
    cfg = EvalConfig(seqlen=32, batch_size=16)
    nll, dnll, nll_se, dnll_se = [], [], [], []
    for draw in range(40):
        # windows of varied predictability: runs of one repeated token among random ones
        g = torch.Generator().manual_seed(100 + draw)
        ids = torch.randint(0, VOCAB, (512,), generator=g)
        ids[torch.rand(512, generator=g) < torch.rand(16, generator=g).repeat_interleave(32)] = 7
        fp = measure_perplexity(model, ids, cfg).to_dict()
        q = measure_perplexity(noisy, ids, cfg).to_dict()
        nll.append(fp["nll"])
        dnll.append(q["nll"] - fp["nll"])
        se = standard_errors(q, fp)
        nll_se.append(window_se(fp["window_nll"], fp["window_tokens"]))
        dnll_se.append(se["dnll_se"])
    # the spread of 40 draws is itself known to ~+-11% (1 sd): a factor of 1.4 either way
    for values, ses in ((nll, nll_se), (dnll, dnll_se)):
        ratio = float(torch.tensor(values).std()) / float(torch.tensor(ses).mean())
        assert 1 / 1.4 < ratio < 1.4, ratio


def test_window_se_is_a_ratio_estimator_and_needs_two_windows():
    # equal windows: the plain standard error of the per-window means
    sums, tokens = [10.0, 12.0, 11.0, 15.0], [5, 5, 5, 5]
    means = torch.tensor(sums, dtype=torch.float64) / 5
    assert window_se(sums, tokens) == pytest.approx(float(means.std() / 2), rel=1e-12)
    # unequal windows weigh by their tokens: the same per-token rate everywhere has no spread
    assert window_se([2.0, 4.0, 6.0], [1, 2, 3]) == 0.0
    assert math.isnan(window_se([3.0], [4]))
    with pytest.raises(Exception, match="different windows"):
        standard_errors({"window_nll": [1.0, 2.0], "window_tokens": [3, 3]},
                        {"window_nll": [1.0, 2.0], "window_tokens": [3, 4]})
