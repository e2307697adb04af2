"""fidelity from the quantized model's NLL pass: the same numbers as its own pass (bitwise on
CPU), with no forward of its own where the pass covers its windows, a pass over only the
windows it lacks (rolling, budget off the stride grid), its own pass where the NLL pass
cannot share (recorded as ``fidelity_own_pass``), and one quantized pass per job."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir

from ptqscale.metrics import EvalConfig
from ptqscale.metrics import fidelity as F
from ptqscale.metrics.perplexity import measure_perplexity
from ptqscale.runner.app import conf_dir
from ptqscale.runner.config import register_configs
from ptqscale.runner.job import run_job


@pytest.fixture(scope="module")
def stories_q(stories):
    """stories260K, a crude int4 copy of it, and the TinyStories stream."""
    model, stream = stories
    quant = copy.deepcopy(model)
    with torch.no_grad():   # a crude int4 round of every block weight: a model that differs
        for mod in quant.model.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                scale = mod.weight.abs().amax(-1, keepdim=True) / 7
                mod.weight.copy_((mod.weight / scale).round().clamp(-7, 7) * scale)
    return model.eval(), quant.eval(), stream


def _forwards(model) -> list:
    """Windows each forward of ``model`` ran (a list that grows)."""
    seen: list = []
    model.register_forward_hook(lambda m, a, out: seen.append(out.logits.shape[0]))
    return seen


@pytest.mark.parametrize("preset, stride, budget, own", [
    ("gptq", None, 5 * 128, False),     # 5 of the NLL's 3+3+... windows: another batching
    ("rolling", 64, 640, False),        # 128 + 8 x 64: the budget ends on the stride grid
    ("rolling", 64, 600, True),         # off the grid: its last window is not the NLL's
])
def test_shared_pass_gives_the_own_pass_numbers(stories_q, preset, stride, budget, own):
    model, quant, stream = stories_q
    cfg = EvalConfig(preset=preset, seqlen=128, stride=stride, batch_size=3)
    ref = F.fp_reference(model, stream, cfg, max_tokens=budget, top_k=64)
    alone = F.compare(quant, stream, cfg, ref, max_tokens=budget)

    shared = F.SharedPass(ref, F.fidelity_windows(stream.numel(), cfg, budget), cfg.seqlen)
    measure_perplexity(quant, stream, cfg, on_logits=shared)
    seen, before = _forwards(quant), F.q_passes
    got = F.compare(quant, stream, cfg, ref, max_tokens=budget, shared=shared)
    assert got == alone    # every field, exactly: the same logits in the same dtype
    assert got["kl_mean"] > 0.01
    assert (F.q_passes - before, sum(seen)) == ((1, 1) if own else (0, 0))


def test_chunked_head_refuses_a_tap(stories_q):
    model, _, stream = stories_q
    cfg = EvalConfig(seqlen=128, head="chunked", max_tokens=256)
    assert F.own_pass_reason(cfg) == "eval.head=chunked"
    assert F.own_pass_reason(EvalConfig(seqlen=128, compile=True)) == "eval.compile=true"
    assert F.own_pass_reason(EvalConfig(seqlen=128)) is None
    with pytest.raises(ValueError, match="chunked"):
        measure_perplexity(model, stream, cfg, on_logits=lambda *a: None)


def test_a_metric_with_a_tap_computes_after_the_pass_its_fields_in_the_order_asked():
    from ptqscale.metrics import Metric
    from ptqscale.metrics.registry import MetricContext
    from ptqscale.runner.measure import measure_metrics

    ran = []
    tapped = Metric("t", lambda ctx: ran.append("t") or {"t": len(ctx.taps["t"])}, False, 1,
                    frozenset(), "t", tap=lambda ctx: [1, 2])
    plain = Metric("p", lambda ctx: ran.append("p") or {"p": 0.0}, False, 1, frozenset(), "p")
    ctx = MetricContext(model=None, stream=None, eval=None, fp={}, params={}, fmt=None,
                        method=None)
    out = measure_metrics((tapped, plain), ctx)
    assert ran == ["p", "t"] and list(out) == ["t", "p"] and out["t"] == 2


FAST = ["eval.max_tokens=2048", "eval.seqlen=256", "progress=false", "wandb.mode=disabled",
        "metrics=[nll,weight_sqnr,model_bytes,fidelity]", "method=rtn", "format=int4"]


@pytest.mark.slow   # four jobs end to end (~40 s on 2 cores)
@pytest.mark.parametrize("model, data", [("stories260k", "tinystories"),
                                         ("gutenberg-llama-200k", "gutenberg")])
def test_a_job_shares_the_nll_pass_and_the_fallback_agrees(tmp_path, monkeypatch, model, data):
    """One quantized pass per job: the windows the model ran are the fp NLL pass, the fp
    reference and the quantized NLL pass (8 windows each); forcing the fallback adds the
    metric's own pass and changes no number and no key."""
    register_configs()
    windows: list = []

    def count(module, args, out):   # windows of full length through a whole model
        logits = getattr(out, "logits", None)
        if logits is not None and logits.shape[1] == 256:
            windows.append(logits.shape[0])

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        recs = {}
        for mode in ("shared", "fallback"):
            if mode == "fallback":
                monkeypatch.setattr(F, "own_pass_reason", lambda cfg: "forced")
            windows.clear()
            with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
                recs[mode] = run_job(compose("config", overrides=[
                    f"model={model}", f"data={data}", f"paths.results={tmp_path / mode}",
                    *FAST]))
            recs[mode]["windows"] = sum(windows)
    finally:
        hook.remove()
    shared, fallback = recs["shared"], recs["fallback"]
    assert shared["job_key"] == fallback["job_key"]
    assert (shared["windows"], fallback["windows"]) == (3 * 8, 4 * 8)
    assert shared["metrics"]["fidelity_own_pass"] is False
    assert fallback["metrics"]["fidelity_own_pass"] is True
    fields = [k for k in shared["metrics"] if k != "fidelity_own_pass"]
    assert {k: shared["metrics"][k] for k in fields} == {k: fallback["metrics"][k] for k in fields}
    assert shared["metrics"]["kl_mean"] > 0


@pytest.mark.slow   # three jobs end to end (~30 s on 2 cores)
def test_streamed_and_spread_jobs_share_the_pass_with_the_same_numbers(tmp_path):
    """A streamed model's block walk and a spread model's forward (over the CPU: the hooks'
    code path) hand the metric the logits of the model in one piece: the same numbers."""
    register_configs()
    extra = {"one": [], "streamed": ["model.placement=streamed", "model.max_gpu_memory=1GiB",
                                     "model.dtype=auto"],
             "spread": ["model.placement=spread", "model.device=cpu"]}
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        recs = {p: run_job(compose("config", overrides=[
            "model=stories260k", "data=tinystories", f"paths.results={tmp_path / p}", *FAST,
            *more]))["metrics"] for p, more in extra.items()}
    fields = ("kl_mean", "kl_p90", "kl_p99", "kl_max", "flip_rate", "fidelity_tokens", "nll_sum")
    for p in ("streamed", "spread"):
        assert {f: recs[p][f] for f in fields} == {f: recs["one"][f] for f in fields}, p
        assert recs[p]["fidelity_own_pass"] is False, p
    assert recs["one"]["kl_mean"] > 0
