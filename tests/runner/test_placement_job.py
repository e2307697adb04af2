"""A job streamed, under a budget, spread, or with dtype auto has the key and numbers of the default."""

from __future__ import annotations

from runner_utils import FAST

from ptqscale.runner.job import run_job


def test_streamed_job_has_the_key_and_numbers_of_the_one_piece_job(composed, tmp_path):
    def job(folder: str, *extra: str) -> dict:
        return run_job(composed(["method=rtn", "format=int4_g128", "wandb.mode=disabled",
                                 f"paths.results={tmp_path / folder}", *FAST, *extra]))

    one = job("one")
    streamed = job("streamed", "model.placement=streamed", "model.max_gpu_memory=1GiB",
                   "model.dtype=auto")  # stories260K is a float32 GGUF: auto = float32
    assert one["status"] == streamed["status"] == "complete"
    assert streamed["job_key"] == one["job_key"]
    assert streamed["config"]["model"]["placement"] == "streamed"
    assert (streamed["env"]["placement"], one["env"]["placement"]) == ("streamed", "one")
    for name in ("nll_sum", "nll_fp", "weight_sqnr_db", "tokens"):
        assert streamed["metrics"][name] == one["metrics"][name], name
    # spread over the CPU (the one-device map: the hooks' code path); records its map
    spread = job("spread", "model.placement=spread", "model.device=cpu")
    assert spread["status"] == "complete" and spread["job_key"] == one["job_key"]
    assert spread["env"]["placement"] == "spread" and "device_map" not in one["env"]
    assert spread["env"]["device_map"].startswith("cpu=") and ".layers.0-" in \
        spread["env"]["device_map"]
    for name in ("nll_sum", "nll_fp", "weight_sqnr_db", "tokens"):
        assert spread["metrics"][name] == one["metrics"][name], name


def test_spread_without_a_gpu_fails_the_run_not_the_plan(composed, tmp_path):
    """On a machine without a GPU a spread job is refused before its model loads (naming what
    to set); a plan (made for another machine) still validates it."""
    import pytest
    import torch

    from ptqscale.errors import ConfigError
    from ptqscale.runner.job import validate_job

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = composed(["method=rtn", "format=int4_g128", "wandb.mode=disabled",
                    f"paths.results={tmp_path}", *FAST, "model.placement=spread"])
    validate_job(cfg)  # planning: the key, no machine check
    for check in (lambda: validate_job(cfg, bind=True), lambda: run_job(cfg)):
        with pytest.raises(ConfigError, match="placement=spread needs at least one CUDA GPU"):
            check()
