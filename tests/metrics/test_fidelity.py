"""fidelity on the real tiny models: KL 0 and no flips for method none, KL rising as bits
fall (RTN int8 < int6 < int4 < int3), the fp reference computed once per model and read
from the cache by the next jobs, and the per-token KL equal to a float64 reference."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir

from ptqscale.metrics import EvalConfig
from ptqscale.metrics import fidelity as F
from ptqscale.runner.app import conf_dir
from ptqscale.runner.config import register_configs
from ptqscale.runner.job import run_job

FAST = ["eval.max_tokens=2048", "eval.seqlen=256", "progress=false", "wandb.mode=disabled",
        "metrics=[nll,weight_sqnr,model_bytes,fidelity]"]


@pytest.mark.slow
@pytest.mark.parametrize("model, data", [("stories260k", "tinystories"),
                                         ("gutenberg-llama-200k", "gutenberg")])
def test_kl_zero_for_none_and_rising_with_fewer_bits(tmp_path, model, data):
    register_configs()
    F.fp_passes = 0
    jobs = [("none", "bf16"), ("rtn", "int8"), ("rtn", "int6"), ("rtn", "int4"), ("rtn", "int3")]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        recs = {f: run_job(compose("config", overrides=[
            f"model={model}", f"data={data}", f"method={m}", f"format={f}",
            f"paths.results={tmp_path}", *FAST]))["metrics"] for m, f in jobs}
    assert F.fp_passes == 1   # one fp reference for five jobs: the others read the cache
    assert [recs[f]["fidelity_fp_cached"] for _, f in jobs] == [False] + [True] * 4
    assert len(list((tmp_path / "_cache" / "fidelity").glob("*.pt"))) == 1
    none = recs["bf16"]
    assert none["kl_mean"] == none["kl_max"] == none["flip_rate"] == 0.0
    assert none["top1_agreement"] == 1.0
    kl = [recs[f]["kl_mean"] for f in ("int8", "int6", "int4", "int3")]
    assert 0 < kl[0] < kl[1] < kl[2] < kl[3], kl
    for f in ("int8", "int6", "int4", "int3"):
        r = recs[f]
        assert r["kl_mean"] <= r["kl_max"] and r["kl_p90"] <= r["kl_p99"] <= r["kl_max"]
        assert r["flip_rate"] + r["top1_agreement"] == pytest.approx(1.0)
        flips = r["flip_rate"] * r["fidelity_tokens"]   # a count of tokens
        assert flips == pytest.approx(round(flips), abs=1e-6)
    assert recs["int3"]["flip_rate"] > recs["int8"]["flip_rate"]
    # the budget is that of the NLL here: the same windows, the same scored tokens
    assert recs["int8"]["fidelity_tokens"] == recs["int8"]["tokens"]


def _rtn(model, bits: int):
    """An independent round-to-nearest copy: symmetric per output row."""
    q = copy.deepcopy(model)
    top = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for mod in q.model.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                scale = mod.weight.abs().amax(-1, keepdim=True) / top
                mod.weight.copy_((mod.weight / scale).round().clamp(-top, top) * scale)
    return q


def test_kl_matches_a_float64_reference(stories):
    model, stream = stories
    quant = _rtn(model, 4)
    cfg = EvalConfig(preset="gptq", seqlen=128, batch_size=2)
    budget = 4 * 128   # four windows
    vocab = model.get_output_embeddings().weight.shape[0]
    ref = F.fp_reference(model, stream, cfg, max_tokens=budget, top_k=vocab)
    got = F.compare(quant, stream, cfg, ref, max_tokens=budget)

    # float64 reference, one window at a time: KL(p||q) = sum_v p (log p - log q)
    def f64(m):   # the GGUF model refuses .double() (transformers: "quantized"); cast by hand
        return copy.deepcopy(m)._apply(lambda t: t.double() if t.is_floating_point() else t)

    m64, q64 = f64(model), f64(quant)
    kls = []
    with torch.no_grad():
        for i in range(4):
            ids = stream[i * 128:(i + 1) * 128][None].long()
            lp = torch.log_softmax(m64(input_ids=ids).logits[0, :-1], -1)
            lq = torch.log_softmax(q64(input_ids=ids).logits[0, :-1], -1)
            kls.append((lp.exp() * (lp - lq)).sum(-1))
    want = torch.cat(kls)
    assert got["fidelity_tokens"] == want.numel() == 4 * 127
    assert got["kl_mean"] == pytest.approx(float(want.mean()), rel=1e-4)
    assert got["kl_max"] == pytest.approx(float(want.max()), rel=1e-4)
    assert got["kl_p99"] == pytest.approx(float(torch.quantile(want, 0.99)), rel=1e-3)
    assert got["kl_mean"] > 0.01   # int4 moves stories260K: the comparison is not of zeros

    # a top-k reference smaller than the vocabulary: the coarsened KL, a lower bound close
    # to the full one (the rest bucket holds the least likely tokens)
    small = F.compare(quant, stream, cfg, F.fp_reference(model, stream, cfg, budget, 64),
                      max_tokens=budget)
    assert small["fidelity_top_k"] == 64
    assert small["kl_mean"] <= got["kl_mean"] + 1e-9
    assert small["kl_mean"] == pytest.approx(got["kl_mean"], rel=0.2)
    assert small["flip_rate"] == got["flip_rate"]   # argmax is kept whatever k is


def test_kl_zero_against_itself(stories):
    """The compare path itself (not the method-none shortcut) gives exactly 0."""
    model, stream = stories
    cfg = EvalConfig(preset="rolling", seqlen=128, batch_size=3)
    ref = F.fp_reference(model, stream, cfg, max_tokens=600, top_k=32)
    got = F.compare(model, stream, cfg, ref, max_tokens=600)
    assert got["kl_max"] == 0.0 and got["flip_rate"] == 0.0
    assert got["fidelity_tokens"] == 599   # rolling: every token after the first, once


def test_fp_reference_cache_reused_and_corrupt_entry_recomputed(stories, tmp_path):
    from ptqscale.metrics.registry import MetricContext

    model, stream = stories
    ctx = MetricContext(model=model, stream=stream, eval=EvalConfig(seqlen=128, batch_size=4),
                        fp={}, params={}, fmt=None, method=None, results=str(tmp_path),
                        fp_key="0123456789abcdef")
    F.fp_passes = 0
    first = F.prepare_reference(ctx)
    again = F.prepare_reference(ctx)
    assert (first["cached"], again["cached"], F.fp_passes) == (False, True, 1)
    assert torch.equal(first["logp"], again["logp"]) and torch.equal(first["idx"], again["idx"])
    (path,) = (tmp_path / "_cache" / "fidelity").glob("*.pt")
    path.write_bytes(b"not a tensor file")
    fresh = F.prepare_reference(ctx)
    assert fresh["cached"] is False and F.fp_passes == 2
    assert torch.equal(fresh["logp"], first["logp"])
    assert list(path.parent.glob("*.corrupt-*"))   # moved aside, not silently overwritten
