"""Results that cannot be right fail the job with the reason; they are never stored complete.

A copy of the embedded gutenberg-llama-200k is corrupted three ways (a NaN, a missing tensor,
a final norm flipped so the model is confidently wrong) and run as a real job each.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from runner_utils import FAST, run_cli
from safetensors.torch import load_file, save_file

from ptqscale.assets import ZOO_CHECKPOINTS
from ptqscale.errors import ImplausibleResultError
from ptqscale.models import ModelConfig, load_model
from ptqscale.runner.measure import check_nll

MEMBER = "gutenberg-llama-200k"


def _corrupt(tmp_path: Path, how: str) -> Path:
    folder = tmp_path / "weights"
    shutil.copytree(Path(ZOO_CHECKPOINTS) / MEMBER, folder)
    tensors = load_file(folder / "model.safetensors")
    if how == "nan":
        tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
    elif how == "missing":
        del tensors["model.layers.1.self_attn.k_proj.weight"]
    elif how == "wrong":  # finite, but every logit flipped and sharpened
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * -30.0
    elif how == "big":  # finite, beyond fp16's range (65504): an fp16 cast makes it inf
        tensors["model.layers.1.self_attn.q_proj.weight"][2, 9] = 1e5
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(("how", "reason"), [
    ("nan", "non-finite values .* model.layers.0.mlp.down_proj.weight"),
    ("missing", "1 weight tensor.* missing .*model.layers.1.self_attn.k_proj.weight"),
])
def test_the_loader_refuses_what_it_would_have_to_invent(tmp_path, how, reason):
    cfg = ModelConfig(name=MEMBER, path=str(_corrupt(tmp_path, how)), device="cpu")
    with pytest.raises(ImplausibleResultError, match=reason):
        load_model(cfg)


def test_nll_bounds():
    check_nll(6.0, "fp", vocab=8192)               # below ln(8192) = 9.01
    check_nll(12.0, "quantized")                   # a broken quantized model may be that bad
    with pytest.raises(ImplausibleResultError, match="above ln\\(vocab\\) = 9.0109"):
        check_nll(9.2, "fp", vocab=8192)
    with pytest.raises(ImplausibleResultError, match="is nan"):
        check_nll(math.nan, "quantized")


@pytest.mark.slow
@pytest.mark.parametrize(("how", "reason"), [
    ("nan", "non-finite"), ("missing", "missing from the checkpoint"),
    ("wrong", "above ln\\(vocab\\)")])
def test_an_implausible_model_gives_a_failed_record(tmp_path, how, reason):
    folder = _corrupt(tmp_path, how)
    out = run_cli([f"model={MEMBER}", f"model.path={folder}", "data=gutenberg", "method=rtn",
                   "format=int8", "eval.max_tokens=2048", "progress=false",
                   "wandb.mode=disabled"], tmp_path / "results")
    assert out.returncode != 0
    (path,) = (tmp_path / "results" / "adhoc" / "records").glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "failed"
    assert record["error"]["type"] == "ImplausibleResultError"
    assert re.search(reason, record["error"]["message"]), record["error"]["message"]
    assert "metrics" not in record or record["metrics"].get("nll") is None
    assert not list((tmp_path / "results" / "_cache").glob("fp_eval/*.json"))  # never cached


@pytest.mark.parametrize(("method", "count"), [
    ("rtn", "1"), pytest.param("gptq", "\\d+", marks=pytest.mark.slow)])
def test_a_format_that_creates_an_inf_fails_the_job(tmp_path, composed, method, count):
    """Finite fp weights, one of them beyond fp16's range: the fp16 job fails at that layer,
    naming it, the count, the place and the values, and stores no metrics (GPTQ carries the
    inf along the row; it fails there, before the next layer is calibrated on NaN)."""
    from ptqscale.runner.job import JobFailed, run_job

    folder = _corrupt(tmp_path, "big")
    cfg = composed([f"model={MEMBER}", f"model.path={folder}", "model.device=cpu",
                    "data=gutenberg", f"method={method}", "format=fp16", "wandb.mode=disabled",
                    f"paths.results={tmp_path / 'results'}", *FAST])
    with pytest.raises(JobFailed, match="ImplausibleResultError"):
        run_job(cfg)
    (path,) = (tmp_path / "results" / "adhoc" / "records").glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "failed"
    assert re.fullmatch(
        rf"model\.layers\.1\.self_attn\.q_proj: the quantized weight holds {count} non-finite "
        r"value\(s\) \(NaN/inf\) where the full-precision weight was finite \(of 4096\), "
        r"first at \(2, 9\): 99840\.0 -> inf", record["error"]["message"]), record["error"]
    assert "metrics" not in record or record["metrics"].get("nll") is None


def test_non_finite_quantized_weights_fail():
    from ptqscale.models import check_finite

    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(ImplausibleResultError, match="weight"):
        check_finite(model, "rtn into int4: the quantized model")
