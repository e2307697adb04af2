"""Memory knobs of the HVPs: micro-batches of windows and (not) retained graphs.

Whatever ``hvp_windows`` and ``hvp_retain_graph`` are, the Hessian is the one of the mean
NLL over all the budget's tokens: checked against a one-shot double backward of that loss on
a causal toy LM that is float64 throughout (agreement to rounding), and the trace and
eigenvalue features of a tiny Llama against each other (its RMSNorm and rotary embedding
compute in fp32 even in a float64 model, so agreement to fp32 rounding there).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ptqscale.errors import ConfigError
from ptqscale.metrics import hessian as hs
from ptqscale.metrics.landscape import LandscapeConfig, _batch_hvps, measure_hessian, nll_loss

N_WINDOWS = 6


class CausalToyLM(nn.Module):
    """Embedding -> tanh(Linear) -> causal running mean over positions -> tanh -> Linear."""

    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.emb, self.mix, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, dim), \
            nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(ids)))
        h = h.cumsum(1) / torch.arange(1, ids.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.head(torch.tanh(h))


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = CausalToyLM().double().eval()
    data = torch.randint(0, 11, (N_WINDOWS, 9), generator=torch.Generator().manual_seed(3))
    return model, {"mix": model.mix, "head": model.head}, data


@pytest.fixture(scope="module")
def tiny():
    """A 1-layer Llama in float64, a few steps from initialisation, and 6 windows of 12 tokens."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=24, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).double()
    gen = torch.Generator().manual_seed(2)
    data = torch.randint(0, 24, (N_WINDOWS, 12), generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        nll_loss(model, data).backward()
        opt.step()
    model.set_attn_implementation("eager")
    targets = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    return model.eval(), targets, data


def _one_shot_hvp(model, weights, data, v):
    """Reference: H v of the mean NLL over every window at once (no micro-batches)."""
    grads = torch.autograd.grad(nll_loss(model, data), weights, create_graph=True)
    return [h.detach() for h in torch.autograd.grad(grads, weights, v)]


def _summed(model, weights, data, cfg, retain):
    return hs.summed_hvp(_batch_hvps(model, data, weights, None, cfg, retain), weights)


# hvp_windows 1, 2, 3 divide 6 windows; 4 and 5 leave a short last micro-batch (2 and 1)
@pytest.mark.parametrize("hvp_windows", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("retain", [True, False])
def test_microbatched_hvp_equals_one_shot_hvp(toy, hvp_windows, retain):
    model, targets, data = toy
    weights = [m.weight for m in targets.values()]
    v = hs.gaussian(weights, seed=4)
    cfg = LandscapeConfig(max_tokens=10**6, hvp_windows=hvp_windows)
    with hs.double_backward_ready(model, weights):
        expect = _one_shot_hvp(model, weights, data, v)
        got = _summed(model, weights, data, cfg, retain)(v)
    assert [g.dtype for g in got] == [torch.float64] * len(got)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert max(float(e.abs().max()) for e in expect) > 1e-2  # not a vacuous zero Hessian


def test_retained_graph_serves_many_probes_with_the_same_products(toy):
    model, targets, data = toy
    weights = [m.weight for m in targets.values()]
    with hs.double_backward_ready(model, weights):
        loss_fn = lambda: nll_loss(model, data)  # noqa: E731
        kept = hs.autograd_hvp(loss_fn, weights, retain_graph=True)
        fresh = hs.autograd_hvp(loss_fn, weights, retain_graph=False)
        for seed in (0, 1, 2):
            v = hs.rademacher(weights, seed)
            for a, b in zip(kept(v), fresh(v)):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
                assert a.grad_fn is None and b.grad_fn is None  # detached: no graph escapes


@pytest.mark.parametrize("hvp_windows, retain", [(1, False), (4, True), (6, False)])
def test_trace_and_eigenvalue_do_not_depend_on_the_memory_knobs(tiny, hvp_windows, retain):
    model, targets, data = tiny
    common = dict(max_tokens=10**6, hutchinson_probes=6, power_iters=8, power_tol=0.0)
    ref = measure_hessian(model, targets, data, LandscapeConfig(hvp_windows=N_WINDOWS, **common))
    out = measure_hessian(model, targets, data, LandscapeConfig(
        hvp_windows=hvp_windows, hvp_retain_graph=retain, **common))
    # only the summation order differs (and the fp32 inside Llama's norm and rotary)
    for key in ("hessian_trace", "kappa_h", "top_eigenvalue"):
        assert out[key] == pytest.approx(ref[key], rel=1e-6), key
    assert abs(ref["top_eigenvalue"]) > 1e-3 and ref["hessian_trace"] != 0
    assert (out["hvp_windows"], out["hvp_retain_graph"]) == (hvp_windows, retain)
    per_probe = 1 if retain else 6  # forward passes over the budget for the trace
    assert out["cost_hessian_trace_tokens"] == per_probe * data.numel()
    assert out["cost_top_eigenvalue_tokens"] == 8 * data.numel()


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "1", None])
def test_bad_hvp_windows_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"landscape\.hvp_windows .*integer >= 1"):
        LandscapeConfig(hvp_windows=value)


@pytest.mark.parametrize("value", [0, 1, "yes", None])
def test_bad_hvp_retain_graph_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"landscape\.hvp_retain_graph must be true or false"):
        LandscapeConfig(hvp_retain_graph=value)


def test_memory_knobs_are_recorded_but_not_in_the_key():
    cfg = LandscapeConfig()
    assert (cfg.hvp_windows, cfg.hvp_retain_graph) == (1, True)
    assert set(LandscapeConfig.not_in_key) == {"hvp_windows", "hvp_retain_graph"}
