"""Pareto frontier and budget answers on any measured field (task accuracy, KL, top-1
agreement), on the committed awq_tasks and crossquant_tasks records: every answer against
brute force over the records, in the direction their metric_info declares. No counts are
pinned: the lead adds the larger members' records to these studies."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ptqscale_analysis.cli import pareto_main
from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.load import add_target, load_study
from ptqscale_analysis.predictor import PredictorConfig, train_predictor
from ptqscale_analysis.queries import (
    best_under_budget,
    pareto_frontier,
    select,
    setting_columns,
    split,
)

RESULTS = Path(__file__).resolve().parents[2] / "results"
ACC = "task.ptq_gutenberg_cloze.acc"
BUDGET = 2e6
# field -> higher is better (fidelity: kl_* lower, top1_agreement higher; tasks: acc higher)
TARGETS = {ACC: True, "kl_mean": False, "top1_agreement": True}


@pytest.fixture(scope="module")
def awq():
    return load_study(RESULTS, "awq_tasks")


@pytest.fixture(scope="module")
def gutenberg(awq):
    return select(awq, data="gutenberg")


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = pareto_main(["--results", str(RESULTS), "--budget", "2MB", "--n-estimators", "20",
                      *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _brute_front(frame: pd.DataFrame, y: str, higher: bool) -> set:
    b, v = frame["model_bytes"].to_numpy(float), frame[y].to_numpy(float) * (-1 if higher else 1)
    dominated = [((b <= b[i]) & (v <= v[i]) & ((b < b[i]) | (v < v[i]))).any()
                 for i in range(len(b))]
    return set(frame.index[~np.array(dominated)])


@pytest.mark.parametrize("field", list(TARGETS))
def test_frontier_and_measured_best_follow_the_declared_direction(gutenberg, field):
    higher, y = TARGETS[field], f"metrics.{field}"
    ans = best_under_budget(gutenberg, BUDGET, target=field)
    assert ans.target.source == y and ans.target.higher_is_better is higher
    under = gutenberg[gutenberg["model_bytes"] <= BUDGET]
    best = under[y].max() if higher else under[y].min()
    assert ans.measured[y] == best and ans.measured["model_bytes"] <= BUDGET
    front = pareto_frontier(gutenberg, y=y)
    assert set(front.index) == _brute_front(gutenberg, y, higher)
    values = front[y].to_numpy()   # larger models buy a better value, never a worse one
    assert np.all(np.diff(values) > 0) if higher else np.all(np.diff(values) < 0)


@pytest.mark.parametrize("field", [ACC, "kl_mean"])
def test_predicted_best_is_the_fp_value_moved_by_the_predicted_damage(awq, gutenberg, field):
    pred = train_predictor(awq, PredictorConfig(n_estimators=20, target=field))
    ans = best_under_budget(gutenberg, BUDGET, pred)   # the predictor's target by default
    higher = TARGETS[field]
    cand = ans.candidates
    under = cand[cand["model_bytes"] <= BUDGET]
    assert ans.predicted["value"] == (under["value"].max() if higher else under["value"].min())
    predicted = cand[cand["source"] == "predicted"]
    assert (predicted["low"] <= predicted["value"]).all()
    assert (predicted["value"] <= predicted["high"]).all()
    # the 16-bit rows carry each model's measured method=none value of the field
    df, t = add_target(gutenberg, field)
    none = df[df["method.name"] == "none"].set_index("model.name")[t.source]
    fp = cand[cand["source"] == "measured fp"].set_index("model.name")["value"]
    assert fp.to_dict() == pytest.approx(none.to_dict())
    if field == "kl_mean":   # KL is 0 at full precision: the unquantized model wins if it fits
        assert (fp == 0).all() and ans.predicted["value"] == 0
    with pytest.raises(AnalysisError, match=f"the predictor learned {field}, not dnll"):
        best_under_budget(gutenberg, BUDGET, pred, target="dnll")


def test_cli_answers_per_corpus_and_says_which_group_lacks_the_field(awq, capsys):
    rc, out, _ = _cli(capsys, "--study", "awq_tasks", "--target", ACC)
    assert rc == 0
    assert f"target: metrics.{ACC} (higher is better" in out
    assert "== data=gutenberg, family=gutenberg-llama" in out
    # the cloze of Gutenberg is not a task of stories260K's corpus
    assert f"== data=tinystories, family=llama2c\n  no record of this group measured metrics.{ACC}" \
        in out
    measured = re.search(rf"best measured:  (\S+) (\S+) (\S+): {re.escape(ACC)} ([0-9.]+)", out)
    gut = select(awq, data="gutenberg")
    under = gut[gut["model_bytes"] <= BUDGET]
    row = under.loc[under[f"metrics.{ACC}"].idxmax()]
    assert measured.group(4) == f"{row[f'metrics.{ACC}']:.4f}"
    assert measured.groups()[:3] == (row["model.name"], row["format.name"], row["method.name"])
    assert "best predicted:" in out


def test_cli_refuses_an_unknown_field_and_one_the_selection_does_not_hold(capsys):
    rc, _, err = _cli(capsys, "--study", "awq_tasks", "--target", "kl_maen")
    assert rc == 2 and err.startswith("error: target 'kl_maen': no record measured")
    assert "'kl_mean'" in err and f"'{ACC}'" in err and "Traceback" not in err
    assert "acc_stderr" not in err   # only fields with a direction can be targets
    rc, _, err = _cli(capsys, "--study", "awq_tasks", "--data", "gutenberg",
                      "--target", "task.ptq_tinystories_cloze.acc")
    assert rc == 2 and "no record of study 'awq_tasks' with these --data" in err
    assert f"'{ACC}'" in err and "ptq_tinystories_cloze" not in err.split("there:")[1]
    rc, _, err = _cli(capsys, "--study", "awq_tasks", "--target", f"{ACC}_stderr")
    assert rc == 2 and "does not say whether higher" in err


def test_activation_schemes_answer_measured_per_scheme_on_kl(capsys):
    study = load_study(RESULTS, "crossquant_tasks")
    rc, out, _ = _cli(capsys, "--study", "crossquant_tasks", "--data", "gutenberg",
                      "--target", "kl_mean")
    assert rc == 0 and "measured answers only" in out
    for labels, part in split(select(study, data="gutenberg")):
        scheme = labels["activations"]
        block = out.split(f"== activations={scheme}\n")[1].split("\n== ")[0]
        under = part[part["model_bytes"] <= BUDGET]
        assert f"kl_mean {under['metrics.kl_mean'].min():.4f}," in block.splitlines()[0]


def test_other_metric_settings_never_compete(gutenberg):
    df, t = add_target(gutenberg, ACC)
    fewshot = "metric_info.tasks.settings.num_fewshot"
    assert fewshot in setting_columns(df, t)
    assert setting_columns(df, add_target(df, "dnll")[1]) == []   # NLL: SPLITS only
    five = df.assign(**{fewshot: 5, f"metrics.{ACC}": df[f"metrics.{ACC}"] + 0.3})
    both = pd.concat([df, five], ignore_index=True)
    groups = split(both, setting_columns(both, t))
    assert [labels for labels, _ in groups] == [{fewshot: "0"}, {fewshot: "5"}]
    with pytest.raises(AnalysisError, match="metric settings are not comparable"):
        best_under_budget(both, BUDGET, target=ACC)
    # KL is measured by another metric: the task settings do not split it
    assert len(split(both, setting_columns(both, add_target(both, "kl_mean")[1]))) == 1


def test_report_with_a_target_has_its_frontier(awq, gutenberg, tmp_path):
    from ptqscale_analysis.laws import FitConfig
    from ptqscale_analysis.report import ReportConfig, write_report
    from ptqscale_analysis.study_fits import StudyFitConfig

    cfg = ReportConfig(StudyFitConfig(fit=FitConfig(n_boot=5), target="top1_agreement"),
                       PredictorConfig(n_estimators=20, target="top1_agreement"))
    md = write_report(RESULTS, "awq_tasks", tmp_path, cfg).read_text()
    section = md.split("## Pareto frontier (model bytes vs top1_agreement, measured; higher is "
                       "better)\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| gutenberg")]
    front = pareto_frontier(gutenberg, y="metrics.top1_agreement")
    assert len(rows) == len(front) > 1
    assert [r.split(" | ")[1:3] for r in rows] == front[["format.name", "method.name"]].values.tolist()
