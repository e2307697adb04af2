"""Every conf group and every sweep composes and validates, without loading a model."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from ptqscale.errors import ConfigError
from ptqscale.methods import get_method
from ptqscale.models.config import looks_like_path
from ptqscale.runner import keys as job_keys
from ptqscale.runner.app import conf_dir
from ptqscale.runner.job import validate_job
from ptqscale.runner.plan import expand_sweep

CONF = Path(conf_dir())
SWEEPS = sorted(p.stem for p in (CONF.parent / "sweeps").glob("*.yaml"))
# conf groups whose options are all compatible with the default model and data
GROUPS = ["model", "data", "eval", "method", "calib", "landscape"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(composed, group):
    for option in options(group):
        cfg = composed([f"{group}={option}"])
        assert cfg[group] is not None


@pytest.mark.parametrize("method", options("method"))
def test_every_method_validates(composed, method):
    spec = validate_job(composed([f"method={method}", "format=int4_g128"]))
    # the record's name: the method's, or a label that finds it (blockft_single)
    assert get_method(spec.method.name) == get_method(method)
    assert len(spec.key) == 16


@pytest.mark.parametrize("study", SWEEPS)
def test_every_sweep_composes_and_validates(composed, study):
    if "optuna" in study:     # trials chosen as it goes: plan refuses, one trial validates
        with pytest.raises(ConfigError, match="grid studies"):
            expand_sweep([f"+sweep={study}"])
        assert validate_job(composed([f"+sweep={study}"])).study == study
        return
    jobs = expand_sweep([f"+sweep={study}"])
    assert jobs, f"sweep {study} expands to no job"
    keys = set()
    # the factory zoo's members are absent here (trained, not committed): a few compose checks
    for job in jobs[:30 if study.startswith("zoo_") else 200]:
        cfg = composed(job)
        assert cfg.study == study
        if looks_like_path(cfg.model.path) and not Path(cfg.model.path).exists():
            continue  # larger family members are reproduced by one command, not committed
        # (hub members validate offline: docs/models.md "Planning without the hub")
        keys.add(validate_job(cfg).key)
    # the factory zoo is trained, not committed: tests/zoo/test_zoo_studies.py validates its
    # studies' jobs against a member it trains
    assert keys or study.startswith("zoo_")


def test_key_ignores_paths_and_logging(composed, tmp_path):
    a = validate_job(composed(["method=rtn", "format=int8"]))
    b = validate_job(composed(["method=rtn", "format=int8", f"paths.results={tmp_path}",
                               "progress=false", "wandb.mode=disabled"]))
    c = validate_job(composed(["method=rtn", "format=int4_g128"]))
    assert a.key == b.key != c.key


@pytest.mark.parametrize("override, needle", [
    (["method=nosuch"], "nosuch"),
    (["model=nosuch"], "nosuch"),
    (["data=nosuch"], "nosuch"),
    (["model.nosuch_key=1"], "nosuch_key"),
])
def test_composition_errors_name_the_key(composed, override, needle):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as e:
        composed(override)
    assert needle in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override, needle", [
    (["method=rtn", "format=int5_x"], "int5_x"),
    (["method=rtn", "format=mxint4_b0"], "mxint4_b0"),
    (["data.name=nosuch"], "nosuch"),
    (["model.path=/nonexistent/model"], "/nonexistent/model"),
    (["eval.seqlen=1"], "seqlen"),
    (["eval.seqlen=4096"], "4096"),
    (["method=rtn", "format=int4_g128", "method.allow_padding=false"], "allow_padding"),
    (["wandb.mode=sometimes"], "wandb.mode"),
    (["+model.nosuch_key=1"], "model.nosuch_key"),   # force-added keys too
    (["method=rtn", "+method.targets.inclde=[x]"], "inclde"),
])
def test_bad_values_are_refused_before_loading(composed, override, needle):
    with pytest.raises(ConfigError) as e:
        validate_job(composed(override))
    assert needle in str(e.value)


def test_key_ignores_speed_only_method_fields(composed):
    base = validate_job(composed(["method=gptq", "format=int4_g128"])).key
    same = validate_job(composed(["method=gptq", "format=int4_g128", "method.batch_size=2",
                                  "method.offload=true"])).key
    other = validate_job(composed(["method=gptq", "format=int4_g128", "method.percdamp=0.1"])).key
    assert base == same != other


def test_key_ignores_the_eval_batch_size(composed):
    """Windows per pass are speed-only: a study re-run at another batch size finds its jobs
    (and the shared full-precision and landscape entries)."""
    spec = validate_job(composed(["method=rtn", "format=int8"]))
    other = validate_job(composed(["method=rtn", "format=int8", "eval.batch_size=3"]))
    assert spec.key == other.key
    assert (job_keys.fp_eval_key(spec.model, spec.data, spec.eval)
            == job_keys.fp_eval_key(other.model, other.data, other.eval))
    assert validate_job(composed(["method=rtn", "format=int8", "eval.seqlen=128"])).key != spec.key


def test_fp_entries_of_another_content_version_are_never_read(composed, monkeypatch):
    """An entry written before the per-window sums (content 1) lies under another key: it is
    not read, nor called corrupt; the job's own key does not move."""
    spec = validate_job(composed(["method=rtn", "format=int8"]))
    now = job_keys.fp_eval_key(spec.model, spec.data, spec.eval)
    monkeypatch.setattr(job_keys, "FP_EVAL_CONTENT", job_keys.FP_EVAL_CONTENT - 1)
    assert job_keys.fp_eval_key(spec.model, spec.data, spec.eval) != now
    assert validate_job(composed(["method=rtn", "format=int8"])).key == spec.key


def test_job_names_spell_out_the_activation_scheme(composed):
    base = ["+sweep=crossquant", "+sweep/crossquant_model@_global_=stories260k",
            "+sweep/crossquant_bits@_global_=w8a8"]
    names = {s: validate_job(composed([*base, f"+sweep/crossquant_scheme@_global_={s}"])).name
             for s in ("per_token", "crossquant", "crossquant_a050")}
    assert names["per_token"].endswith("/int8/rtn+aint8_per_token")
    assert names["crossquant"].endswith("/rtn+aint8_crossquant_a0.15")
    assert len(set(names.values())) == 3
    assert validate_job(composed(["method=rtn"])).name.endswith("/rtn")  # weight-only: as before
