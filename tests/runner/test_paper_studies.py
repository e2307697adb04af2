"""The seed papers' studies (sweeps/xu2024, shabanovi2024, crossquant2024, athena2024) run end
to end on a CPU with stand-ins on a few grid points per family, and ptqscale-report lays each
out as its paper's tables (analysis/ptqscale_analysis/paper_tables.py).

The grid points are the studies' own (``+sweep=<study>`` with its axes subset on the command
line); only the budgets shrink (tokens, calibration, landscape probes, fine-tuning steps).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ptqscale.runner.config import register_configs
from ptqscale.runner.job import run_job
from ptqscale.runner.plan import expand_sweep
from ptqscale.runner.planner import compose, hydra_context
from ptqscale.store import read_records
from ptqscale_analysis.errors import AnalysisError
from ptqscale_analysis.laws import FitConfig
from ptqscale_analysis.predictor import PredictorConfig
from ptqscale_analysis.report import ReportConfig, write_report
from ptqscale_analysis.study_fits import StudyFitConfig

# What every smoke job shares: stand-ins on the CPU, small budgets. Calibration from the
# embedded Gutenberg (the studies' WikiText-2 train comes from the hub).
SMALL = ["model.stand_in=true", "model.dtype=float32", "model.device=cpu", "calib=gutenberg",
         "calib.nsamples=8", "calib.seqlen=128", "calib.data.max_documents=1",
         "eval.seqlen=128", "eval.max_tokens=1024", "progress=false", "wandb.mode=disabled"]
# study -> (axes subset, per-job budget overrides): two families each, both kinds of axis.
SLICES = {
    "xu2024": (["model=pythia-70m,qwen2.5-0.5b", "format=mxint4_b32,mxint3_b128"],
               ["landscape.max_tokens=256", "landscape.seqlen=128", "landscape.seeds=1",
                "landscape.hutchinson_probes=1", "landscape.power_iters=2",
                "landscape.levels_db=[40.0,20.0]", "landscape.directional_ts=[1.0]"]),
    "shabanovi2024": (["model=opt-125m,llama-3.2-1b", "format=int3_g128",
                       "+sweep/blockft_method@_global_=single,joint2,down1"], ["method.iters=5"]),
    "crossquant2024": (["model=opt-125m,llama-3.2-1b", "+sweep/crossquant_bits@_global_=w8a8,w4a4",
                        "+sweep/crossquant_scheme@_global_=per_token,crossquant"],
                       ["eval.tasks.names=[ptq_gutenberg_cloze]", "eval.tasks.limit=16"]),
    "athena2024": (["model=opt-1.3b,llama-3.2-1b", "format=int3_g32"], []),
}
EXTRA = {"shabanovi2024": (["model=opt-125m,llama-3.2-1b", "format=int3_g128",
                            "+sweep/blockft_method@_global_=rtn"], [])}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Results root holding every study's smoke records."""
    pytest.importorskip("lm_eval", reason="crossquant2024 asks for the metric 'tasks'")
    root = tmp_path_factory.mktemp("paper_studies")
    register_configs()
    with hydra_context():
        for study, (axes, budget) in [*SLICES.items(), *EXTRA.items()]:
            for job in expand_sweep([f"+sweep={study}", *axes]):
                run_job(compose(overrides=[*job, *SMALL, *budget, f"paths.results={root}"]))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("study,jobs,archs", [
    ("xu2024", 8, {"gpt_neox", "qwen2"}), ("shabanovi2024", 8, {"opt", "llama"}),
    ("crossquant2024", 8, {"opt", "llama"}), ("athena2024", 6, {"opt", "llama"})])
def test_paper_study_runs_end_to_end_on_stand_ins(smoke, study, jobs, archs):
    records = read_records(smoke, study, status=None)
    assert len(records) == jobs and (records["status"] == "complete").all(), \
        records.get("error.message", records["status"]).tolist()
    assert records["model.path"].str.startswith("stand-in:").all()
    assert {s.split()[1] for s in records["env.stand_in"]} == archs
    assert (records["data.name"] == "wikitext2").all()   # the study's corpus, not overridden
    assert all(math.isfinite(v) and v < math.log(8192) for v in records["metrics.nll"])
    if study == "xu2024":   # landscape features measured per model
        assert records["landscape.hessian_trace"].notna().all()
    if study == "crossquant2024":   # zero-shot accuracy through lm-eval
        assert records["metrics.task.ptq_gutenberg_cloze.acc"].between(0, 1).all()


def _tables(smoke, study, tmp_path) -> list[pd.DataFrame]:
    write_report(smoke, study, tmp_path, ReportConfig(StudyFitConfig(fit=FitConfig(n_boot=10)),
                                                      PredictorConfig(n_estimators=10)))
    md = (tmp_path / "report.md").read_text()
    assert f"## Paper tables ({study})" in md and "Stand-in records" in md
    assert md.index("## Paper tables") < md.index("## Study")   # besides the standard report
    return [pd.read_csv(p, dtype=str, keep_default_na=False)
            for p in sorted((tmp_path / "tables").glob("*.csv"), key=lambda p: int(p.stem))]


@pytest.mark.slow
def test_xu2024_tables(smoke, tmp_path):
    nll_rtn, nll_gptq, dnll, sqnr, features = _tables(smoke, "xu2024", tmp_path)
    for t in (nll_rtn, nll_gptq):   # model x format, the full-precision column first
        assert list(t.columns) == ["model", "full precision", "mxint4_b32", "mxint3_b128"]
        assert list(t["model"]) == ["pythia-70m", "qwen2.5-0.5b"]
    assert list(dnll["method"]) == ["RTN", "GPTQ", "RTN", "GPTQ"]
    assert list(sqnr.columns) == ["model", "mxint4_b32", "mxint3_b128"]
    assert all(float(v) > 5 for v in sqnr.iloc[:, 1:].to_numpy().ravel())
    assert {"kappa", "Hessian trace", "NLL (fp)"} <= set(features.columns)
    rec = read_records(smoke, "xu2024")
    rec = rec[(rec["model.name"] == "qwen2.5-0.5b") & (rec["format.name"] == "mxint3_b128")
              & (rec["method.name"] == "gptq")].iloc[0]
    assert nll_gptq.iloc[1]["mxint3_b128"] == f"{rec['metrics.nll']:.4f}"


@pytest.mark.slow
def test_shabanovi2024_table(smoke, tmp_path):
    ppl, seconds = _tables(smoke, "shabanovi2024", tmp_path)
    assert list(ppl["method"]) == ["RTN", "single block", "2 blocks jointly",
                                   "1 block, error 1 block down"]
    assert list(ppl.columns) == ["method", "llama-3.2-1b", "opt-125m"]   # one table per format
    assert all(float(v) > 1 for v in ppl.iloc[:, 1:].to_numpy().ravel())
    assert all(float(v) >= 0 for v in seconds.iloc[:, 1:].to_numpy().ravel())


@pytest.mark.slow
def test_crossquant2024_tables(smoke, tmp_path):
    ppl, acc, per_task, kernel = _tables(smoke, "crossquant2024", tmp_path)
    for t in (ppl, acc, kernel):
        assert list(t.columns) == ["W/A", "scheme", "llama-3.2-1b", "opt-125m"]
    assert list(ppl["W/A"]) == ["full precision", "W8A8", "W8A8", "W4A4", "W4A4"]
    assert list(ppl["scheme"])[1:] == ["per-token", "CrossQuant (alpha=0.15)"] * 2
    rec = read_records(smoke, "crossquant2024")
    rec = rec[(rec["model.name"] == "opt-125m") & (rec["format.name"] == "int4")
              & (rec["method.activations.granularity"] == "per_token")].iloc[0]
    assert ppl.iloc[3]["opt-125m"] == f"{rec['metrics.perplexity']:.2f}"
    assert acc.iloc[2]["opt-125m"] == f"{rec['metrics.tasks_acc']:.4f}"
    assert list(per_task.columns) == ["model", "W/A", "scheme", "ptq_gutenberg_cloze"]
    assert per_task.iloc[6]["ptq_gutenberg_cloze"] == \
        f"{rec['metrics.task.ptq_gutenberg_cloze.acc']:.4f}"   # opt-125m W4A4 per-token


@pytest.mark.slow
def test_athena2024_tables(smoke, tmp_path):
    ppl, bits = _tables(smoke, "athena2024", tmp_path)
    assert list(ppl["method"]) == ["RTN", "GPTQ", "Athena"]
    assert list(bits.columns) == ["method", "llama-3.2-1b", "opt-1.3b"]
    assert set(bits["llama-3.2-1b"]) == {"3.500"}   # 3 bits + an fp16 scale per 32


def test_unknown_paper_tables_are_refused(tmp_path):
    with pytest.raises(AnalysisError, match="no such paper tables.*xu2024"):
        write_report(tmp_path, "any", tmp_path / "out", tables="xu2025")
