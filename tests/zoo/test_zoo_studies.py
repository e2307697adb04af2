"""The zoo studies (issue 22): their grids expand offline to the planned size, and a job of
each validates against a member the factory trained (the zoo is not committed)."""

from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_dir

from ptqscale.runner.app import conf_dir
from ptqscale.runner.config import register_configs
from ptqscale.runner.job import validate_job
from ptqscale.runner.plan import expand_sweep
from ptqscale.zoo import factory
from ptqscale.zoo.family import load_family


@pytest.fixture
def composed():
    """compose(overrides) -> DictConfig, with conf/ and the schemas registered."""
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        yield lambda overrides: compose("config", overrides=list(overrides))


def _axis(jobs: list[list[str]], key: str) -> set[str]:
    return {o.split("=", 1)[1] for job in jobs for o in job if o.startswith(key + "=")}


def test_the_cross_study_is_every_member_at_x1_both_corpora_both_methods(composed):
    jobs = expand_sweep(["+sweep=zoo_cross"])
    assert len(jobs) == 20 * 2 * 2 * 13
    assert {m.split("-")[1] for m in _axis(jobs, "model")} == {"llama", "gpt2", "opt", "neox"}
    assert _axis(jobs, "data") == {"gutenberg", "wikitext2"}
    assert _axis(jobs, "method") == {"rtn", "gptq"}


def test_the_depth_study_spans_every_revision(composed):
    jobs = expand_sweep(["+sweep=zoo_depth"])
    assert _axis(jobs, "model.revision") == {"x0.25", "x0.5", "x1", "x2", "x4"}
    assert len(jobs) == 20 * 5 * 4   # 4 families x 5 sizes; 5 revisions; 4 formats


@pytest.mark.parametrize("study, extra", [("zoo_cross", ["model.revision=x1"]),
                                          ("zoo_depth", ["model.revision=x0.25"])])
def test_a_zoo_study_job_validates_on_a_trained_member(study, extra, tiny_data, tmp_path,
                                                     composed):
    # the gpt2 recipe shrunk to CPU size, under the member name the sweeps use
    fam = dataclasses.replace(load_family("zoo-gpt2"), sizes={"25k": 32}, vocab_size=320,
                              train_chars=4_000, seqlen=256, batch_seqs=2, base_tokens=8192,
                              warmup_steps=1, eval_tokens=512)
    factory.train_family(fam, tiny_data["data"], tmp_path, device="cpu", log=lambda *a: None)
    cfg = composed([f"+sweep={study}", "model=zoo-gpt2-25k", f"paths.zoo={tmp_path}", *extra])
    spec = validate_job(cfg)
    assert spec.study == study and spec.model.revision == extra[0].split("=")[1]
    assert len(spec.key) == 16
