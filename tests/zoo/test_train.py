"""Training on CPU with tiny budgets; saved folders reload through the normal loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ptqscale.errors import ConfigError
from ptqscale.zoo import train_family
from ptqscale.zoo.config import ZooConfig
from ptqscale.zoo.data import gptq_windows, gutenberg_documents
from ptqscale.zoo.evaluate import nll_sum
from ptqscale.zoo.model import build_model
from ptqscale.zoo.tokenizer import load_tokenizer
from ptqscale.zoo.train import load_member, save_member, train_member

TINY = {"seqlen": 32, "batch_tokens": 256, "train_tokens": 256 * 12, "evals": 2,
        "valid_tokens": 1024}


def _args(tiny_data, tmp_path, out):
    return ["--data", str(tiny_data["data"]), "--out", str(out), "--device", "cpu",
            "--cache", str(tmp_path / "cache"), "--wikitext", str(tiny_data["wikitext"])] + \
        [f"--set={k}={v}" for k, v in TINY.items() if k != "train_tokens"] + \
        ["--tokens", str(TINY["train_tokens"])]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("member") / "m"
    cfg = ZooConfig(size="200k", **TINY)
    record = train_member(cfg, tiny_data["data"], out, device="cpu",
                          cache_dir=tiny_data["root"] / "cache",
                          wikitext_test=tiny_data["wikitext"], log=lambda *a: None)
    return out, record


def test_loss_drops_in_a_few_cpu_steps(trained):
    _, rec = trained
    losses = [h[1] for h in rec["train"]["history"]]
    assert len(losses) == 12  # one entry per step at this budget
    assert losses[0] > 8.5  # ~ln(8192) = 9.01 at init
    assert losses[-1] < losses[0] - 1.0
    evals = rec["train"]["evals"]
    assert [e["step"] for e in evals] == [6, 12] and rec["train"]["best_step"] in (6, 12)


def test_folder_is_a_plain_hf_checkpoint(trained):
    out, rec = trained
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "zoo.json"} <= names
    assert json.loads((out / "zoo.json").read_text()) == json.loads(json.dumps(rec))
    assert rec["recipe"]["derived"]["steps"] == 12 and rec["params"]["non_embedding"] == 213568
    assert set(rec["eval"]) == {"gutenberg_valid", "gutenberg_test", "wikitext2_test"}
    assert rec["data"]["train"]["books"] == 3


def test_reported_nll_matches_transformers_own_loss(trained):
    out, rec = trained
    model = load_member(out)
    tok = load_tokenizer(out / "tokenizer.json")
    text = "\n\n".join(_test_docs(rec))
    windows = torch.as_tensor(gptq_windows(np.asarray(tok.encode(text).ids), 32))
    with torch.no_grad():  # HF shifts labels itself and averages over the 31 scored positions
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert np.mean(losses) == pytest.approx(rec["eval"]["gutenberg_test"]["nll"], abs=1e-5)
    assert len(windows) == rec["eval"]["gutenberg_test"]["windows"]


def _test_docs(rec):
    return gutenberg_documents(rec["data"]["data_dir"], "test")


def test_golden_nll_recomputes_from_the_folder(trained):
    out, rec = trained
    tok = load_tokenizer(out / "tokenizer.json")
    ids = tok.encode("\n\n".join(_test_docs(rec))).ids
    windows = gptq_windows(np.asarray(ids), 32)[: rec["golden"]["windows"]]
    s, n = nll_sum(load_member(out), windows)
    assert s / n == pytest.approx(rec["golden"]["nll"], abs=1e-6)


def test_save_and_reload_offline_gives_identical_logits(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ZooConfig(size="200k")
    model = build_model(cfg)
    save_member(model, cfg, load_tokenizer(), tmp_path)
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    with torch.no_grad():  # the reference: the same weights rounded to bfloat16, as saved
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert (tmp_path / "model.safetensors").exists()
    ids = AutoTokenizer.from_pretrained(tmp_path)("It was the best of times.",
                                                 return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_family_command_trains_smallest_first_and_skips_finished(tiny_data, tmp_path, capsys):
    out = tmp_path / "family"
    train_family.main(_args(tiny_data, tmp_path, out) + ["--sizes", "500k,200k"])
    summary = json.loads((out / "family.json").read_text())
    assert [m["size"] for m in summary["members"]] == ["200k", "500k"]
    assert set(summary["monotonic"]) == {"gutenberg_valid", "gutenberg_test", "wikitext2_test"}
    assert "| gutenberg-llama-200k |" in (out / "family.md").read_text()
    capsys.readouterr()
    train_family.main(_args(tiny_data, tmp_path, out) + ["--sizes", "200k"])
    assert "already trained, skipped" in capsys.readouterr().out


def test_family_command_rejects_unknown_sizes_before_training(tmp_path):
    with pytest.raises(ConfigError, match="size=\\['7m'\\] is not one of"):
        train_family.main(["--data", str(tmp_path), "--out", str(tmp_path), "--sizes", "7m"])
