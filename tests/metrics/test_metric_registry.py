"""The metric registry: a metric is one registration, reaches the record and the analysis,
is refused early when unknown or unrunnable, and never re-keys jobs that did not ask for it."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from ptqscale.errors import ConfigError
from ptqscale.metrics import DEFAULT_METRICS, METRICS, register_metric, resolve_metrics
from ptqscale.metrics.registry import check_device, metrics_identity
from ptqscale.runner import keys
from ptqscale.runner.app import conf_dir
from ptqscale.runner.config import register_configs
from ptqscale.runner.job import run_job, validate_job

FAST = ["eval.max_tokens=2048", "eval.seqlen=256", "progress=false", "wandb.mode=disabled"]
WITH_TOY = "metrics=[nll,weight_sqnr,model_bytes,toy_noise]"


@pytest.fixture
def composed():
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        yield lambda overrides=(): compose("config", overrides=list(overrides))


@pytest.fixture
def toy_metrics():
    """Register test metrics for one test, and remove them afterwards.

    ``toy_noise`` keeps the full-precision target weights (``prepare``, before quantization)
    and measures ||W - Q(W)||^2 / ||W||^2 over them: an independent route to the weight
    SQNR that the method reports, so it only agrees if ``prepare`` ran on the fp model.
    """
    from ptqscale.models import get_anatomy

    def keep_fp_weights(ctx):
        return {n: m.weight.detach().clone() for n, m in dict(get_anatomy(ctx.model).targets).items()}

    @register_metric("toy_noise", higher_is_better=False, version=3,
                     needs=("fp_model", "report"), prepare=keep_fp_weights)
    def measure_toy_noise(ctx):
        fp = ctx.prepared["toy_noise"]
        targets = dict(get_anatomy(ctx.model).targets)
        noise = sum(float(((targets[n].weight.double() - w.double()) ** 2).sum())
                    for n, w in fp.items())
        signal = sum(float((w.double() ** 2).sum()) for w in fp.values())
        return {"toy_noise": noise / signal}

    @register_metric("toy_gpu", higher_is_better=True, version=1, needs=("gpu",))
    def measure_toy_gpu(ctx):
        return {"toy_gpu": 1.0}

    yield
    for name in ("toy_noise", "toy_gpu"):
        METRICS.pop(name, None)


@pytest.mark.slow
def test_a_registered_metric_reaches_the_record_and_the_analysis(composed, tmp_path, toy_metrics):
    from ptqscale_analysis.load import higher_is_better, load_study

    rec = run_job(composed(["method=rtn", "format=int4_g128", f"paths.results={tmp_path}",
                            WITH_TOY, *FAST]))
    m = rec["metrics"]
    assert rec["status"] == "complete"
    assert m["toy_noise"] == pytest.approx(10 ** (-m["weight_sqnr_db"] / 10), rel=1e-6)
    assert rec["metric_info"]["toy_noise"] == {"version": 3, "higher_is_better": False,
                                               "headline": "toy_noise",
                                               "needs": ["fp_model", "report"]}
    assert rec["metric_info"]["weight_sqnr"]["higher_is_better"] is True
    assert "prepare_toy_noise" in rec["timings"]
    # the same job with the default metrics: another key, and the same NLL
    plain = run_job(composed(["method=rtn", "format=int4_g128", f"paths.results={tmp_path}",
                              *FAST]))
    assert plain["job_key"] != rec["job_key"] and "toy_noise" not in plain["metrics"]
    assert plain["metrics"]["nll"] == m["nll"]
    frame = load_study(tmp_path, "adhoc")
    assert frame["metrics.toy_noise"].notna().sum() == 1
    assert higher_is_better(frame, "metrics.weight_sqnr_db")
    assert not higher_is_better(frame, "metrics.toy_noise")
    # and in the study summary, next to the default columns
    from ptqscale.runner.callbacks import summarize_study

    summarize_study(str(tmp_path), "adhoc")
    header = (tmp_path / "adhoc" / "summary.md").read_text().splitlines()[4]
    assert "metrics.weight_sqnr_db" in header and "metrics.toy_noise" in header


def test_unknown_metric_is_refused_before_any_model_load(composed, tmp_path, monkeypatch):
    import ptqscale.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    cfg = composed([f"paths.results={tmp_path}", "metrics=[nll,weight_sqnrr]", *FAST])
    with pytest.raises(ConfigError, match=r"unknown metric 'weight_sqnrr' \(did you mean "
                                          r"'weight_sqnr'\?\); allowed: \[.*'model_bytes'"):
        run_job(cfg)
    assert not list(tmp_path.rglob("*"))   # nothing written: not even a name binding


@pytest.mark.parametrize("names, message", [
    (["weight_sqnr"], r"lacks \['nll'\]"),
    (["nll", "nll"], r"\['nll'\] listed twice"),
])
def test_bad_metric_lists_are_refused(names, message):
    with pytest.raises(ConfigError, match=message):
        resolve_metrics(names)


def test_a_gpu_metric_on_a_cpu_run_is_refused_before_load(composed, tmp_path, toy_metrics):
    cfg = composed([f"paths.results={tmp_path}", "model.device=cpu",
                    "metrics=[nll,toy_gpu]", *FAST])
    with pytest.raises(ConfigError, match=r"metrics \['toy_gpu'\] need a GPU.*model.device=cpu"):
        run_job(cfg)
    assert not list(tmp_path.rglob("*"))   # nothing written: not even a name binding
    metrics = resolve_metrics(["nll", "toy_gpu"])
    check_device(metrics, "auto", cuda_devices=1)      # a GPU machine runs it
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        check_device(metrics, "auto", cuda_devices=0)


def test_default_metrics_keep_every_key_and_extras_key_by_version(composed, tmp_path,
                                                                   toy_metrics):
    spec = validate_job(composed([f"paths.results={tmp_path}", "method=rtn", *FAST]))
    assert [m.name for m in spec.metrics] == list(DEFAULT_METRICS)
    args = (spec.study, spec.model, spec.data, spec.eval, spec.method, spec.calib,
            spec.landscape, spec.seed)
    # the default set (in any order) is in no key: keys of stores before the registry hold
    assert spec.key == keys.job_key(*args)
    reordered = resolve_metrics(["model_bytes", "nll", "weight_sqnr"])
    assert keys.job_key(*args, metrics=reordered) == spec.key
    assert metrics_identity(reordered) is None
    # a registered metric a job does not ask for changes nothing (toy_noise is registered)
    assert "toy_noise" in METRICS and spec.key == keys.job_key(*args, metrics=spec.metrics)
    extra = validate_job(composed([f"paths.results={tmp_path}", "method=rtn", WITH_TOY, *FAST]))
    assert extra.key != spec.key
    assert metrics_identity(extra.metrics)["toy_noise"] == 3
    fewer = keys.job_key(*args, metrics=resolve_metrics(["nll"]))
    assert len({spec.key, extra.key, fewer}) == 3


def test_a_metric_needing_calibration_gets_it_and_keys_it(composed, tmp_path):
    @register_metric("toy_calib", higher_is_better=True, version=1, needs=("calibration",))
    def measure_toy_calib(ctx):
        return {"toy_calib": float(ctx.calibration.numel())}

    try:
        plain = validate_job(composed([f"paths.results={tmp_path}", "method=rtn", *FAST]))
        spec = validate_job(composed([f"paths.results={tmp_path}", "method=rtn",
                                      "metrics=[nll,toy_calib]", *FAST]))
    finally:
        METRICS.pop("toy_calib")
    assert plain.calib is None and spec.calib is not None


def test_the_registry_is_loud():
    with pytest.raises(ValueError, match="registered twice"):
        register_metric("nll", higher_is_better=False, version=1)(lambda ctx: {})
    with pytest.raises(ValueError, match="unknown needs"):
        register_metric("x", higher_is_better=False, version=1, needs=("logits",))
    with pytest.raises(ValueError, match="prepare"):
        register_metric("x", higher_is_better=False, version=1, needs=("fp_model",))
    assert "x" not in METRICS


def test_two_metrics_writing_one_field_fail():
    from ptqscale.metrics import Metric
    from ptqscale.runner.measure import measure_metrics

    a = Metric("a", lambda ctx: {"nll": 1.0}, False, 1, frozenset(), "nll")
    b = Metric("b", lambda ctx: {"nll": 0.0}, False, 1, frozenset(), "nll")
    with pytest.raises(RuntimeError, match=r"metric 'b' writes \['nll'\]"):
        measure_metrics((a, b), None)


def test_metric_settings_enter_key_and_info_of_jobs_that_ask_only():
    """A metric's ``settings(eval_cfg)`` (e.g. ``tasks``: eval.tasks) keys and records it."""
    from ptqscale.metrics import EvalConfig

    @register_metric("toy_set", higher_is_better=True, version=2,
                     settings=lambda e: {"seqlen": e.seqlen})
    def measure_toy_set(ctx):
        return {"toy_set": 1.0}

    try:
        toy = resolve_metrics(["nll", "weight_sqnr", "model_bytes", "toy_set"])
        short, long = EvalConfig(seqlen=128), EvalConfig(seqlen=256)
        assert metrics_identity(toy, short)["toy_set"] == {"version": 2,
                                                           "settings": {"seqlen": 128}}
        assert metrics_identity(toy, short) != metrics_identity(toy, long)
        assert METRICS["toy_set"].info(long)["settings"] == {"seqlen": 256}
        assert metrics_identity(resolve_metrics(DEFAULT_METRICS), short) is None
    finally:
        METRICS.pop("toy_set", None)
