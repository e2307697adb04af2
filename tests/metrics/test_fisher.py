"""fisher: the diagonal-Fisher structure factor of a job's weight error, against an
independent computation (``.backward`` into ``.grad``, flattened sums), ~1 for isotropic noise,
and recorded by a real job on the embedded reference family."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from ptqscale.formats import get_format
from ptqscale.metrics import fisher as FI
from ptqscale.metrics import hessian as hs
from ptqscale.metrics.registry import MetricContext
from ptqscale.models import get_anatomy
from ptqscale.runner.app import conf_dir
from ptqscale.runner.config import register_configs
from ptqscale.runner.job import run_job


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    model = tiny_llama
    windows = torch.randint(0, 64, (6, 32), generator=torch.Generator().manual_seed(1))
    return model, windows


def _reference_fisher(model, windows):
    """Per-window ``loss.backward()`` into ``.grad`` (another autograd entry point), squared."""
    targets = get_anatomy(model).targets
    fisher = {n: torch.zeros_like(m.weight, dtype=torch.float64) for n, m in targets.items()}
    for w in windows:
        model.zero_grad(set_to_none=True)
        logits = model(w[None]).logits[0, :-1].double()
        torch.nn.functional.cross_entropy(logits, w[1:]).backward()
        for n, m in targets.items():
            fisher[n] += m.weight.grad.double() ** 2
    model.zero_grad(set_to_none=True)
    return fisher


def _context(model, windows):
    return MetricContext(model=model, stream=None, eval=None, fp={}, params={}, fmt=None,
                         method=None, calibration=windows)


def test_fisher_ratio_matches_an_independent_computation(tiny):
    model, windows = tiny
    ref_f = _reference_fisher(model, windows)
    ctx = _context(model, windows)
    ctx.prepared["fisher"] = FI.prepare_fisher(ctx)
    targets = get_anatomy(model).targets
    fp = {n: m.weight.detach().clone() for n, m in targets.items()}
    fmt = get_format("int4_g32")
    try:
        with torch.no_grad():
            for m in targets.values():
                m.weight.copy_(fmt.fake_quantize(m.weight))
        got = FI.measure_fisher(ctx)["fisher_ratio"]
        num = den = 0.0
        for n, m in targets.items():
            e = (m.weight.detach() - fp[n]).double().flatten()
            f = ref_f[n].flatten()
            num += float((f * e * e).sum())
            den += float((e * e).mean() * f.sum())
    finally:
        with torch.no_grad():
            for n, m in targets.items():
                m.weight.copy_(fp[n])
    assert got == pytest.approx(num / den, rel=1e-4)
    for n, f in zip(ctx.prepared["fisher"]["names"], ctx.prepared["fisher"]["statistic"]):
        assert torch.allclose(f.double(), ref_f[n], rtol=1e-3, atol=1e-12)


def test_isotropic_noise_has_ratio_one_and_no_error_has_none(tiny):
    model, windows = tiny
    targets = get_anatomy(model).targets
    weights = [m.weight for m in targets.values()]
    with hs.double_backward_ready(model, weights, eager=False):
        fisher = FI.fisher_diagonal(model, weights, windows)
    ratios = [FI.fisher_ratio(fisher, hs.gaussian(weights, seed)) for seed in range(20)]
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.05)
    # an error on the most sensitive half of each layer's weights only: well above 1
    top = [e * (f >= f.median()) for e, f in zip(hs.gaussian(weights, 99), fisher)]
    assert FI.fisher_ratio(fisher, top) > 1.5
    assert FI.fisher_ratio(fisher, [torch.zeros_like(w) for w in weights]) is None


@pytest.mark.slow
def test_a_job_records_the_fisher_ratio(tmp_path):
    register_configs()
    fast = ["model=gutenberg-llama-200k", "data=gutenberg", "eval.max_tokens=2048",
            "eval.seqlen=256", "calib.nsamples=8", "calib.seqlen=256", "progress=false",
            "wandb.mode=disabled", f"paths.results={tmp_path}",
            "metrics=[nll,weight_sqnr,model_bytes,fisher]"]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        rec = {f: run_job(compose("config", overrides=[*fast, f"method={m}", f"format={f}"]))
               for m, f in (("none", "bf16"), ("rtn", "int4_g128"), ("rtn", "int3_g128"))}
    assert rec["bf16"]["metrics"]["fisher_ratio"] is None   # nothing changed
    for f in ("int4_g128", "int3_g128"):
        assert 0.3 < rec[f]["metrics"]["fisher_ratio"] < 3.0
        assert rec[f]["metric_info"]["fisher"]["version"] == FI.VERSION
