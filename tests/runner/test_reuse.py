"""A worker loads a model once for all its jobs of it, and every job's numbers are those of the
job run alone on a fresh load (models/reuse.py)."""

from __future__ import annotations

import pytest
import torch
from runner_utils import FAST

from ptqscale.models import reuse
from ptqscale.runner import measure
from ptqscale.runner.job import JobFailed, run_job

CALIB = ["calib.nsamples=4", "calib.seqlen=128"]
# smoothquant first: its activation hooks and rescaled norms must be gone for the jobs after it
JOBS = [["method=smoothquant", "format=int8", *CALIB],   # int8 activations per token: hooks
        ["method=rtn", "format=int4_g32"],
        ["method=gptq", "format=int4_g32", *CALIB],
        ["method=awq", "format=int4_g32", "method.grid=4", "method.clip_grid=4", *CALIB]]


@pytest.fixture(autouse=True)
def _nothing_kept():
    reuse.forget()
    yield
    reuse.forget()


def _numbers(record: dict) -> dict:
    assert record["status"] == "complete", record.get("error")
    metrics = {k: v for k, v in record["metrics"].items() if k != "fp_cached"}  # bookkeeping
    return {"metrics": metrics, "layers": record["layers"], "key": record["job_key"]}


# the embedded model streamed (weights wait on the CPU, blocks visit the device in turn) in its
# stored dtype: memory-mapped from its safetensors, restored by dropping written pages; its sweep
# spills the quantized weights to disk (paths.spill), the fresh jobs keep them in memory; and
# spread (the one-device map: accelerate's hooks stay through every job)
@pytest.mark.parametrize("model, spills, weights", [
    (["model=stories260k"], False, "copied"),
    (["model=gutenberg-llama-200k", "model.placement=streamed", "model.dtype=bfloat16"], True,
     "mapped"),
    (["model=gutenberg-llama-200k", "model.placement=spread"], False, "copied")])
def test_a_sweep_loads_once_and_matches_fresh_loads(composed, tmp_path, model, spills, weights):
    def job(folder: str, overrides: list[str], *extra: str) -> dict:
        return run_job(composed([*model, "model.device=cpu", "wandb.mode=disabled",
                                 f"paths.results={tmp_path / folder}", *FAST, *overrides,
                                 *extra]))

    jobs = JOBS if len(model) == 1 else JOBS[:2]   # smoothquant and rtn on the other
    spill = [f"paths.spill={tmp_path / 'spill'}"] if spills else []
    swept = [job("sweep", o, *spill) for o in jobs]
    assert (tmp_path / "spill").is_dir() == spills
    assert [r["env"]["model_load"] for r in swept] == ["loaded"] + ["reused"] * (len(jobs) - 1)
    assert {r["env"]["weights"] for r in swept} == {weights}
    assert all(r["timings"]["load"] < 0.05 for r in swept[1:])
    fresh = [job(f"alone{i}", o, "model.reuse=false") for i, o in enumerate(jobs[::-1])][::-1]
    assert all(r["env"]["model_load"] == "loaded" for r in fresh)
    assert [_numbers(r) for r in swept] == [_numbers(r) for r in fresh]


def test_a_failed_job_does_not_poison_the_next(composed, tmp_path, monkeypatch):
    def job(*extra: str, folder: str = "a") -> dict:
        return run_job(composed(["model=stories260k", "model.device=cpu", "wandb.mode=disabled",
                                 f"paths.results={tmp_path / folder}", *FAST, *extra]))

    job("method=rtn", "format=int8")   # loads and keeps the model
    real = measure.check_finite

    def fail(model, what):   # the model is quantized by now: dies half-way through the job
        raise RuntimeError("injected failure after quantizing")

    monkeypatch.setattr(measure, "check_finite", fail)
    with pytest.raises(JobFailed):
        job("method=rtn", "format=int4_g32")
    monkeypatch.setattr(measure, "check_finite", real)
    after = job("method=rtn", "format=int4_g32", "seed=1")
    assert after["env"]["model_load"] == "loaded"   # the quantized model was dropped
    alone = job("method=rtn", "format=int4_g32", "seed=1", "model.reuse=false", folder="b")
    assert _numbers(after) == _numbers(alone)


def test_restore_undoes_data_writes_hooks_and_attributes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    x = torch.randn(3, 4)
    before = model(x)
    snapshot = reuse.ModelSnapshot(model)
    model[0].weight.data.mul_(0.5)            # .data: no version counter sees this
    model[1].bias.data.copy_(-model[1].bias.data.abs() * 0.0)   # -0.0: equal, not bitwise
    model[0].register_forward_pre_hook(lambda m, a: (a[0] * 2,))
    model[0].marker = object()
    written, clean = snapshot.restore()
    assert clean and written == 2
    assert not hasattr(model[0], "marker")
    assert torch.equal(model(x), before)
    model[0] = torch.nn.Linear(4, 4)          # a replaced module cannot be put back
    assert snapshot.restore() == (0, False)
