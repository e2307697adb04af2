"""The GPU cost model (runner/cost.py) and its estimates in ptqscale-plan."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ptqscale.runner import cost, cost_fit
from ptqscale.runner.config import register_configs
from ptqscale.runner.plan import format_plan, plan, plan_json

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "results"
TOKENIZERS = ROOT.parent / "shared" / "data" / "tokenizers"   # as the committed fit read them
WIKI = ROOT / "src" / "ptqscale" / "assets" / "data" / "wikitext-2-raw"


@pytest.fixture(scope="module")
def bench_model():
    return cost_fit.fit(cost_fit.bench_points(BENCH), cost_fit.h200_gib(BENCH))


def test_fit_reproduces_the_bench_points(bench_model):
    """Every benchmark point within 0.4-2.5x of the fit, 85% within 1.3x (the stated
    tolerance; on 2026-12-05 31 of 34: the three outside are one-piece points of other bench
    runs, the worst a perplexity baseline measured at 4.5 s and 2.9 s in two runs)."""
    ratios = [r for _, r in cost_fit.residuals(bench_model, cost_fit.bench_points(BENCH))]
    assert len(ratios) >= 25
    assert all(0.4 <= r <= 2.5 for r in ratios), ratios
    assert sum(1 / 1.3 <= r <= 1.3 for r in ratios) >= 0.85 * len(ratios)


def test_committed_model_is_the_fit_of_the_committed_data():
    """assets/cost_model.json is what --fit makes of bench/results and results/ (not typed in)."""
    committed = cost.load_cost_model()
    refit = cost_fit.fit_files(BENCH, ROOT / "results",
                           TOKENIZERS if (TOKENIZERS / "gpt2").is_dir() else None)
    refit["fitted_from"] = committed["fitted_from"]
    if "tokens_per_char" not in refit:   # a machine without ../shared/data: the rest must agree
        refit["tokens_per_char"] = committed["tokens_per_char"]
    assert _close(json.loads(json.dumps(refit)), committed)
    assert committed["gpu"]["gib"] == pytest.approx(139.8, abs=0.1)   # the H200, as measured


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return b == pytest.approx(a, rel=1e-9, abs=1e-30)
    return a == b


HUB_CORPUS = SimpleNamespace(name="c4", path=None)


def _spec(method="rtn", size="1b", placement="one", max_tokens=262144, landscape=None,
          data=HUB_CORPUS):
    return SimpleNamespace(
        model=SimpleNamespace(size=size, max_gpu_memory=None, dtype="bfloat16",
                              placement=placement),
        eval=SimpleNamespace(max_tokens=max_tokens), method=SimpleNamespace(name=method),
        calib=SimpleNamespace(nsamples=128, seqlen=2048), landscape=landscape, data=data)


def test_a_whole_local_corpus_is_its_characters_in_gpt2_tokens():
    """WikiText-2 test is 287,644 GPT-2 tokens (1,294,336 characters x the fitted ratio);
    eval.max_tokens caps it."""
    from ptqscale.data import DataConfig

    model = cost.load_cost_model()
    wiki = DataConfig(name="wikitext2", split="test", path=str(WIKI))
    assert cost.corpus_tokens(model, wiki, None) == pytest.approx(287644, abs=1)
    assert cost.corpus_tokens(model, wiki, 1000) == 1000
    assert cost.corpus_tokens(model, SimpleNamespace(name="c4", path=None), 5000) == 5000


def test_streamed_gptq_of_14b_is_the_measured_one(bench_model):
    est = cost.estimate_job(bench_model, _spec("gptq", size="12.3b", placement="streamed"))
    gptq = next(s for s in est.stages if s.stage == "gptq")
    assert gptq.seconds == pytest.approx(70.4, rel=0.15)   # streaming_14b_pinned_h200.jsonl
    assert est.placement == "streamed" and est.fits


def test_auto_streams_what_does_not_fit(bench_model):
    one = cost.estimate_job(bench_model, _spec("gptq", size="1b", placement="auto"))
    assert one.placement == "one" and one.fits
    big = cost.estimate_job(bench_model, _spec("gptq", size="66b", placement="auto"))
    assert big.placement == "streamed", big.reason


def test_finite_difference_hessian_is_its_own_stage(bench_model):
    """landscape.hvp=finite_difference runs gradients, no double backward: its own group, whose
    estimate of the 1.24B bench budget (8 forward-difference probes + 4 central power
    iterations over 16k tokens) is the 56.6 s measured (bench_landscape_fd_h200_fd.json); the
    same budget with double backward is charged the autograd group's rate: the 112 s of
    bench_landscape_fd_h200_v1.json, 2x."""
    from ptqscale.metrics.landscape_config import LandscapeConfig

    fd = LandscapeConfig(hessian=True, hutchinson_probes=8, power_iters=4, power_tol=0.0,
                         hvp="finite_difference", fd_trace="forward")
    spec = _spec(size="1.24b", landscape=fd)
    spec.eval.seqlen = 2048
    stages = {s.stage: s for s in cost.estimate_job(bench_model, spec).stages}
    assert "hessian" not in stages
    assert stages["hessian_fd"].seconds == pytest.approx(30.89 + 25.68, rel=0.1)
    autograd = cost.estimate_job(bench_model, _spec(size="1.24b", landscape=LandscapeConfig(
        hessian=True, hutchinson_probes=8, power_iters=4, power_tol=0.0)))
    slow = next(s for s in autograd.stages if s.stage == "hessian").seconds
    assert slow == pytest.approx(75.06 + 36.77, rel=0.15)


@pytest.mark.parametrize("spec, why", [
    (_spec("awq"), "never measured"),                      # no AWQ benchmark in 16-bit
    (_spec("gptq", size="40b", placement="one"), "beyond 8x"),
    (_spec("gptq", size="70b", placement="one"), "needs model.placement=streamed"),
    (_spec(max_tokens=None), "eval.max_tokens=null on the hub corpus"),
    (_spec(size="base"), "not a parameter count"),
])
def test_no_data_no_estimate(bench_model, spec, why):
    est = cost.estimate_job(bench_model, spec)
    assert est.placement is None and not est.stages and why in est.reason


def test_nominal_params():
    assert cost.nominal_params("0.5b") == 5e8 and cost.nominal_params("1b1") == 1.1e9
    assert cost.nominal_params("124m") == 1.24e8 and cost.nominal_params("260k") == 2.6e5
    assert cost.nominal_params("xl") is None


def test_public_family_plan_has_estimates_offline(tmp_path):
    """Pythia members without the hub: needs-download, each job with GPU seconds, peak and
    placement; the fp pass and the landscape charged once per model; totals in GPU-hours."""
    register_configs()
    jobs = plan(["+sweep=family_scan", "model=pythia-160m,pythia-1b", "data=wikitext2",
                 "format=mxint4_b32,mxfp4", "method=rtn", f"paths.results={tmp_path}"])
    assert [j.state for j in jobs] == ["needs-download"] * 4
    assert all(j.gpu_seconds > 0 and j.peak_gib > 0 and j.placement == "one" for j in jobs)
    first, second = jobs[0], jobs[1]   # pythia-160m: mxint4_b32 then mxfp4
    assert {"fp_eval", "noise", "hessian"} <= first.stages.keys()
    assert second.stages.keys() == {"eval", "rtn"} and first.gpu_seconds > second.gpu_seconds
    text = format_plan(jobs)
    assert "GPU-hours" in text and "needs-download" in text
    data = json.loads(plan_json(jobs))
    hours = sum(j.gpu_seconds for j in jobs) / 3600
    assert data["totals"]["gpu_hours"] == pytest.approx(hours)
    assert data["totals"]["estimated"] == 4 and data["jobs"][0]["stages"]["noise"] > 0


def test_fidelity_is_charged_as_forward_passes_and_tasks_get_no_estimate(tmp_path):
    """fidelity: its fp reference with the model's first job, one pass per job, at the eval
    stage's rate over min(16384, eval tokens); tasks: no fit covers lm-eval's passes."""
    from ptqscale.metrics.fidelity import MAX_TOKENS

    register_configs()
    grid = ["+sweep=family_scan", "model=pythia-1b", "data=wikitext2", "format=mxint4_b32,mxfp4",
            "method=rtn", f"paths.results={tmp_path}"]
    plain = plan(grid)
    jobs = plan([*grid, "metrics=[nll,weight_sqnr,model_bytes,fidelity]"])
    first, second = jobs
    assert {"fp_eval", "fp_fidelity", "fidelity", "eval", "rtn"} <= first.stages.keys()
    assert second.stages.keys() == {"eval", "rtn", "fidelity"}
    model = cost.load_cost_model()
    group = model["groups"][f"eval|one|{cost.precision_of('bfloat16')}"]
    seconds, _ = cost.predict(group, 1e9 * MAX_TOKENS, 1e9)   # wikitext2 has more tokens
    assert second.stages["fidelity"] == pytest.approx(seconds)
    assert second.gpu_seconds == pytest.approx(plain[1].gpu_seconds + seconds)
    spec = _spec()
    spec.metrics = (SimpleNamespace(name="nll"), SimpleNamespace(name="tasks"))
    est = cost.estimate_job(model, spec)
    assert est.placement is None and not est.stages and "metric 'tasks'" in est.reason
