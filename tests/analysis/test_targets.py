"""Any measured field as the target of the laws and the predictor, the task and fidelity
columns of the report and the W&B summary: on real records of the reference family's
embedded members (200k, 500k, 1m; RTN int4/int3 and method none, with the metrics
``tasks`` and ``fidelity``)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from ptqscale.runner.app import conf_dir
from ptqscale.runner.config import register_configs
from ptqscale.runner.job import run_job
from ptqscale.runner.tracking import run_summary
from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.laws import FitConfig
from ptqscale_analysis.load import add_target, declared_direction, load_study
from ptqscale_analysis.predictor import PredictorConfig, cross_validate, train_predictor
from ptqscale_analysis.queries import predict_nll, predict_target
from ptqscale_analysis.report import accuracy_fidelity_table, write_report
from ptqscale_analysis.study_fits import StudyFitConfig, fit_study_laws

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                 reason="lm-eval not installed (extra 'tasks')")]
STUDY = "targets"
TASK = "ptq_gutenberg_continuation"
ACC = f"task.{TASK}.acc"
MODELS = ("gutenberg-llama-200k", "gutenberg-llama-500k", "gutenberg-llama-1m")
JOBS = (("none", "bf16"), ("rtn", "int4"), ("rtn", "int3"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    register_configs()
    records = []
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        for model in MODELS:
            for method, fmt in JOBS:
                records.append(run_job(compose("config", overrides=[
                    f"model={model}", "data=gutenberg", "model.device=cpu", f"method={method}",
                    f"format={fmt}", f"study={STUDY}", f"paths.results={root}",
                    "eval.max_tokens=1024", "eval.seqlen=256", "progress=false",
                    "wandb.mode=disabled", "metrics=[nll,weight_sqnr,model_bytes,tasks,fidelity]",
                    f"eval.tasks.names=[{TASK}]", "eval.tasks.limit=20"])))
    assert all(r["status"] == "complete" for r in records), [r.get("error") for r in records]
    return root, records


def test_directions_come_from_metric_info(store):
    frame = load_study(store[0], STUDY)
    assert declared_direction(frame, f"metrics.{ACC}") is True
    assert declared_direction(frame, f"metrics.{ACC}_norm") is True
    assert declared_direction(frame, "metrics.tasks_acc") is True   # the headline
    assert declared_direction(frame, "metrics.top1_agreement") is True
    assert declared_direction(frame, "metrics.kl_p99") is False
    assert declared_direction(frame, "metrics.flip_rate") is False
    assert declared_direction(frame, f"metrics.{ACC}_stderr") is None   # not a quality
    with pytest.raises(AnalysisError, match="does not say whether higher"):
        add_target(frame, f"{ACC}_stderr")
    with pytest.raises(AnalysisError, match="no record measured metrics.kl_maen.*kl_mean"):
        add_target(frame, "kl_maen")


def test_target_is_the_damage_against_the_models_method_none_record(store):
    root, records = store
    frame, t = add_target(load_study(root, STUDY), ACC)
    assert (t.column, t.higher_is_better, t.label) == (f"damage.{ACC}", True, f"{ACC} lost")
    fp = {r["model"]["name"]: r["metrics"][ACC] for r in records if r["method"]["name"] == "none"}
    for r in records:   # accuracy lost = the fp model's accuracy minus this job's
        row = frame[frame["job_key"] == r["job_key"]].iloc[0]
        assert row[t.column] == pytest.approx(fp[r["model"]["name"]] - r["metrics"][ACC])
    kl, t = add_target(frame, "metrics.kl_mean")   # fp KL is 0: the damage is the KL itself
    assert np.allclose(kl[t.column], kl["metrics.kl_mean"]) and (kl[t.fp] == 0).all()
    assert t.label == "kl_mean added"


def test_laws_and_predictor_on_kl_and_accuracy(store):
    frame = load_study(store[0], STUDY)
    fits = fit_study_laws(frame, StudyFitConfig(fit=FitConfig(n_boot=0), target="kl_mean"))
    assert "fp law: fitted to the NLL only (target kl_mean)" in fits.notes
    noise = fits.get("noise", **{"method.name": "rtn"})
    assert noise is not None and noise.n == 6 and noise.converged
    # the noise law on KL: every fitted value within a factor 3 of the measured KL
    q = frame[frame["method.name"] == "rtn"]
    pred = noise.predict(n=q["params.blocks"], sqnr=q["metrics.weight_sqnr_db"])
    assert np.all(np.abs(np.log(pred / q["metrics.kl_mean"])) < np.log(3))
    # dNLL laws are not what was fitted: the KL law differs from the dNLL law
    dnll = fit_study_laws(frame, StudyFitConfig(fit=FitConfig(n_boot=0)))
    assert dnll.get("noise", **{"method.name": "rtn"}).params != noise.params

    acc = fit_study_laws(frame, StudyFitConfig(fit=FitConfig(n_boot=0), target=ACC))
    assert acc.target.name == ACC
    lost = add_target(frame, ACC)[0].loc[q.index, f"damage.{ACC}"]
    law = acc.get("noise", **{"method.name": "rtn"})
    if law is not None:   # fitted to the jobs that lost accuracy, and only to those
        assert law.n == int((lost > 0).sum())
    if (lost <= 0).any():   # the others are counted out with a note, never fitted in log space
        assert f"{int((lost <= 0).sum())} of 6 quantized rows have {ACC} lost <= 0" in " ".join(
            acc.notes)

    cfg = PredictorConfig(n_estimators=20, target="kl_mean")
    pred = train_predictor(frame, cfg)
    assert "target_fp" in pred.features   # the target's fp level is a model feature
    cv = cross_validate(frame, "size", cfg, StudyFitConfig(fit=FitConfig(n_boot=0)))
    assert len(cv.predictions) == 6   # every quantized job held out once
    assert np.allclose(cv.predictions["measured"].sort_values(),
                       np.sort(frame.loc[frame["method.name"] == "rtn", "metrics.kl_mean"]))
    assert cv.metrics.set_index("predictor").loc["noise", "coverage"] > 0
    with pytest.raises(AnalysisError, match="learned the damage to kl_mean"):
        predict_nll(pred, frame, "int4", "rtn", model=MODELS[0])


def test_report_and_wandb_summary_carry_accuracy_and_kl(store, tmp_path):
    root, records = store
    r = next(r for r in records if r["format"]["name"] == "int3")
    summary = run_summary(r)
    for field in (ACC, f"{ACC}_stderr", f"{ACC}_norm", f"{ACC}_norm_stderr",
                  f"task.{TASK}.version", "tasks_acc", "kl_mean", "kl_p99", "flip_rate",
                  "top1_agreement"):
        assert summary[f"metrics/{field}"] == r["metrics"][field], field
    table = accuracy_fidelity_table(load_study(root, STUDY))
    assert len(table) == 9
    assert {f"{TASK} acc", f"{TASK} acc_norm", "KL mean", "KL p99", "flip rate"} <= set(table)
    row = table[(table["model"] == r["model"]["name"]) & (table["format"] == "int3")].iloc[0]
    m = r["metrics"]
    assert row[f"{TASK} acc"] == f"{m[ACC]:.4f} ± {m[ACC + '_stderr']:.4f}"
    assert row["flip rate"] == f"{m['flip_rate']:.4g}"
    md = write_report(root, STUDY, tmp_path / "report").read_text()
    assert "## Task accuracy and fidelity" in md and f"{TASK} 1" in md


def test_predict_a_target_and_its_cli(store, capsys):
    from ptqscale_analysis.cli import predict_main

    root, records = store
    frame = load_study(root, STUDY)
    pred = train_predictor(frame, PredictorConfig(n_estimators=20, target="kl_mean"))
    r = predict_target(pred, frame, "int3", "rtn", MODELS[1])
    job = next(x for x in records if x["model"]["name"] == MODELS[1]
               and x["format"]["name"] == "int3")
    assert r.fp == 0.0 and r.measured == job["metrics"]["kl_mean"]
    assert r.low <= r.value <= r.high and r.value == pytest.approx(r.damage)
    # accuracy: the fp model's accuracy less the predicted loss
    acc = train_predictor(frame, PredictorConfig(n_estimators=20, target=ACC))
    a = predict_target(acc, frame, "int4", "rtn", MODELS[0])
    assert a.value == pytest.approx(a.fp - a.damage) and a.low <= a.value <= a.high
    assert predict_main(["--results", str(root), "--study", STUDY, "--format", "int3",
                         "--method", "rtn", "--model", MODELS[1], "--target", "kl_mean",
                         "--n-estimators", "20"]) == 0
    out = capsys.readouterr().out
    assert f"{MODELS[1]} on gutenberg int3 rtn: kl_mean " in out and "target_fp" in out
    assert predict_main(["--results", str(root), "--study", STUDY, "--format", "int3",
                         "--method", "rtn", "--target", "kl_mean"]) == 2
    assert "--target needs --model" in capsys.readouterr().err
