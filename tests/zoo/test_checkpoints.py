"""The embedded members (src/ptqscale/zoo/checkpoints): loadable offline, as recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ptqscale.zoo import CHECKPOINTS, embedded_members
from ptqscale.zoo.config import ZooConfig
from ptqscale.zoo.data import gptq_windows, gutenberg_documents
from ptqscale.zoo.evaluate import nll_sum
from ptqscale.zoo.tokenizer import load_tokenizer

MEMBERS = embedded_members()


def test_the_smallest_members_are_embedded():
    assert [p.name for p in MEMBERS][:2] == ["gutenberg-llama-200k", "gutenberg-llama-500k"]


@pytest.mark.parametrize("path", MEMBERS, ids=lambda p: p.name)
def test_member_loads_offline_and_matches_its_recipe(path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = json.loads((path / "zoo.json").read_text())
    cfg = ZooConfig(size=rec["size"])  # committed members are the default recipe
    assert rec["recipe"] == json.loads(json.dumps(cfg.to_dict()))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.hidden_size == cfg.hidden and model.config.vocab_size == 8192
    assert sum(p.numel() for p in model.parameters()) == rec["params"]["total"]
    tok = AutoTokenizer.from_pretrained(path)
    family = load_tokenizer()
    text = "It was a dark and stormy night; the rain fell in torrents."
    assert tok(text)["input_ids"] == family.encode(text).ids


@pytest.mark.parametrize("path", MEMBERS, ids=lambda p: p.name)
def test_golden_nll_recomputes_on_cpu(path):
    """The NLL the GPU run recorded for the first test windows, recomputed here in float32:
    the committed weights are the ones that were evaluated."""
    from ptqscale.assets import DATA
    from ptqscale.zoo.train import load_member

    rec = json.loads((path / "zoo.json").read_text())
    g = rec["golden"]
    docs = gutenberg_documents(DATA / "gutenberg-en", "test")
    head = "\n\n".join(docs)[:200_000]  # enough text for the golden windows
    ids = load_tokenizer(path / "tokenizer.json").encode(head).ids
    windows = gptq_windows(np.asarray(ids), g["seqlen"])[: g["windows"]]
    s, n = nll_sum(load_member(path), windows)
    assert s / n == pytest.approx(g["nll"], abs=2e-4)


def test_recorded_nll_falls_with_size():
    recs = [json.loads((p / "zoo.json").read_text()) for p in MEMBERS]
    recs.sort(key=lambda r: r["params"]["non_embedding"])
    for key in ("gutenberg_test", "wikitext2_test"):
        nlls = [r["eval"][key]["nll"] for r in recs]
        assert nlls == sorted(nlls, reverse=True), key


def test_checkpoints_folder_holds_the_family_tokenizer():
    assert (CHECKPOINTS / "tokenizer.json").is_file()
