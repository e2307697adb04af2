"""A job streamed, under a budget, or with dtype auto has the key and numbers of the default."""

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
