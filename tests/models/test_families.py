"""Public model families (conf/model/*.yaml): they compose and plan without the hub, and
their stand-ins (model.stand_in=true) run a study end to end on a CPU, marked as stand-ins."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from huggingface_hub import try_to_load_from_cache

from ptqscale.models import ModelConfig
from ptqscale.models.standins import ARCHITECTURES, FAMILY_ARCHITECTURE
from ptqscale.runner.config import register_configs
from ptqscale.runner.job import run_job
from ptqscale.runner.plan import plan
from ptqscale.runner.planner import compose, hydra_context
from ptqscale.store import read_record

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
MEMBERS = sorted(p.stem for p in CONF.glob("*.yaml"))
HUB = [m for m in MEMBERS if not yaml.safe_load((CONF / f"{m}.yaml").read_text())["path"]
       .startswith("${")]
FAST = ["eval.max_tokens=1024", "eval.seqlen=128", "progress=false", "wandb.mode=disabled"]


@pytest.mark.parametrize("member", MEMBERS)
def test_every_member_spells_out_every_field(member):
    entry = yaml.safe_load((CONF / f"{member}.yaml").read_text())
    assert set(entry) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert entry["name"] == member
    cfg = ModelConfig(**entry)
    assert cfg.dtype != "auto"    # auto needs the checkpoint's config: no offline plan
    assert cfg.family in FAMILY_ARCHITECTURE or not entry["path"].count("/") == 1


def test_every_family_plans_offline(tmp_path):
    """Hub members not in the local cache are listed 'needs-download' with a key, not refused."""
    register_configs()
    jobs = plan([f"model={','.join(HUB)}", "method=rtn", "format=int4_g128",
                 f"paths.results={tmp_path}"])
    assert len(jobs) == len(HUB) >= 50
    for job, member in zip(jobs, HUB):
        path = yaml.safe_load((CONF / f"{member}.yaml").read_text())["path"]
        cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
        assert job.state == ("pending" if cached else "needs-download"), (member, job.reason)
        assert len(job.key) == 16 and f"/{member}/" in job.name
    assert len({j.key for j in jobs}) == len(jobs)


def test_pythia_training_steps_are_an_axis(tmp_path):
    register_configs()
    jobs = plan(["model=pythia-70m", "model.revision=step1000,step143000", "method=rtn",
                 "format=int4_g128", f"paths.results={tmp_path}"])
    assert [j.state for j in jobs] == ["needs-download"] * 2
    assert jobs[0].key != jobs[1].key


def test_stand_in_changes_the_key(tmp_path):
    register_configs()
    real, stand_in = plan(["model=opt-125m", "model.stand_in=false,true", "method=rtn",
                           "format=int4_g128", f"paths.results={tmp_path}"])
    assert real.key != stand_in.key and stand_in.state == "pending"   # no download needed
    assert "~stand-in" in stand_in.name


def test_stand_in_of_a_family_without_one_is_refused():
    with pytest.raises(ValueError, match="no stand-in for family 'llama2c'"):
        ModelConfig(name="s", path="x.gguf", family="llama2c", stand_in=True)


def test_every_stand_in_architecture_is_supported():
    from ptqscale.models.anatomy import SUPPORTED_ARCHITECTURES

    assert set(FAMILY_ARCHITECTURE.values()) == set(ARCHITECTURES)
    assert set(ARCHITECTURES) <= set(SUPPORTED_ARCHITECTURES)


def test_stand_ins_run_a_study_end_to_end(tmp_path):
    """Two architectures (gpt_neox, opt) through RTN on a CPU; the records say stand-in."""
    register_configs()
    records = []
    with hydra_context():
        for member in ("pythia-70m", "opt-125m"):
            cfg = compose(overrides=[f"model={member}", "model.stand_in=true", "model.device=cpu",
                                     "model.dtype=float32", "method=rtn", "format=int4_g32",
                                     f"paths.results={tmp_path}", *FAST])
            records.append(run_job(cfg))
    for record, arch in zip(records, ("gpt_neox", "opt")):
        stored = read_record(str(tmp_path), record["study"], record["job_key"])
        assert stored["status"] == "complete"
        assert stored["model"]["path"].startswith("stand-in:")
        assert stored["identity"]["model"].startswith("stand-in:")
        assert f"random-init {arch} stand-in" in stored["env"]["stand_in"]
        assert stored["config"]["model"]["stand_in"] is True
        # a random model with the unigram-prior head: well above a trained model, below
        # the uniform guess ln(8192) = 9.01 (measured ~7.1)
        assert 5.0 < stored["metrics"]["nll"] < math.log(8192)
        assert math.isfinite(stored["metrics"]["dnll"])
    assert records[0]["job_key"] != records[1]["job_key"]


def test_family_standins_study_runs_every_architecture(tmp_path):
    """+sweep=family_standins: the smallest member of every family, as stand-ins, on a CPU."""
    from ptqscale.runner.plan import expand_sweep

    register_configs()
    with hydra_context():
        jobs = expand_sweep(["+sweep=family_standins"])
        records = [run_job(compose(overrides=[*job, f"paths.results={tmp_path}", "progress=false",
                                              "wandb.mode=disabled"])) for job in jobs]
    assert len(records) == 14
    archs = set()
    for record in records:
        assert record["status"] == "complete" and record["model"]["path"].startswith("stand-in:")
        assert record["metrics"]["nll"] < math.log(8192)
        archs.add(record["env"]["stand_in"].split()[1])
    assert archs == set(ARCHITECTURES)


# The seed papers' studies on the public families (sweeps/<study>.yaml): job count of each grid.
PAPER_STUDIES = {"xu2024": 29 * 2 * 16, "shabanovi2024": 9 * 7 * 2, "crossquant2024": 8 * 3 * 3,
                 "athena2024": 7 * 3 * 2}


@pytest.mark.parametrize("study", sorted(PAPER_STUDIES))
def test_paper_studies_plan_offline(study, tmp_path):
    """Every grid point of a paper study is valid and listed 'needs-download' with its key,
    on public members only (the toy family is not in these studies)."""
    if study == "crossquant2024":
        pytest.importorskip("lm_eval", reason="the study asks for the metric 'tasks'")
    register_configs()
    jobs = plan([f"+sweep={study}", f"paths.results={tmp_path}"])
    assert len(jobs) == PAPER_STUDIES[study]
    assert {j.state for j in jobs} <= {"needs-download", "pending"}, \
        [j.reason for j in jobs if j.state == "invalid"][:3]
    assert len({j.key for j in jobs}) == len(jobs)
    members = {j.name.split("/")[1] for j in jobs}
    assert members <= set(HUB) and all(j.name.startswith(f"{study}/") for j in jobs)
