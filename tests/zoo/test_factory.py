"""The family factory: recipes validate, every preset trains on a CPU deterministically,
checkpoints along the D axis carry the recipe and the tokens seen, conf/model composes."""

from __future__ import annotations

import dataclasses
import json
import tarfile

import numpy as np
import pytest
import torch

from ptqscale.errors import ConfigError
from ptqscale.zoo import factory, manifest
from ptqscale.zoo.data import sha256_file
from ptqscale.zoo.family import family_names, load_family
from ptqscale.zoo.presets import PRESETS

# a family shrunk to CPU size: 32-token windows, 4 per batch, base 8 steps, one size
TINY = dict(sizes={"t": 32}, vocab_size=320, train_chars=4_000, seqlen=32, batch_seqs=4,
            base_tokens=1024, warmup_steps=1, eval_tokens=512)
ARCH = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM",
        "neox": "GPTNeoXForCausalLM"}


def tiny(name: str, **changes):
    return dataclasses.replace(load_family(name), **{**TINY, **changes})


def train(fam, tiny_data, out):
    return factory.train_family(fam, tiny_data["data"], out, device="cpu", log=lambda *a: None)


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_four_families_four_presets_five_sizes():
    fams = [load_family(n) for n in family_names()]
    assert {f.preset for f in fams} == set(PRESETS) and len(fams) >= 4
    assert len({f.vocab_size for f in fams}) == len(fams)  # tokenizers of different sizes
    for fam in fams:
        assert len(fam.sizes) >= 5 and fam.checkpoints == (0.25, 0.5, 1.0, 2.0, 4.0)


@pytest.mark.parametrize("name", family_names())
def test_size_names_state_the_non_embedding_count(name):
    fam = load_family(name)
    for size in fam.sizes:
        count = manifest.member_cost(fam, size)["non_embedding"]
        assert 0.9 < count / (float(size[:-1]) * 1e3) < 1.15, (size, count)


def test_the_gpu_command_fits_its_budget():
    """All families: estimated GPU seconds one at a time < 8 min, checkpoints < 80 MiB raw
    (bf16; xz packs them to ~72%, under the 64 MiB a GPU call returns)."""
    costs = [manifest.member_cost(f, s) for f in map(load_family, family_names()) for s in f.sizes]
    assert sum(c["est_s"] for c in costs) < 480
    assert sum(c["ckpt_mib"] for c in costs) < 80


@pytest.mark.parametrize("name", family_names())
def test_every_preset_trains_and_checkpoints_carry_recipe_and_tokens(name, tiny_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = tiny(name)
    records = train(fam, tiny_data, tmp_path)
    assert [r["checkpoint"]["multiple"] for r in records] == [0.25, 0.5, 1.0, 2.0, 4.0]
    data = records[0]["data"]
    for rec in records:
        ck = rec["checkpoint"]
        assert ck["tokens"] == ck["multiple"] * 1024 == ck["steps"] * 128
        assert ck["epochs"] == pytest.approx(ck["steps"] * 4 / data["train_windows"], abs=1e-6)
        assert ck["max_times_seen"] == -(-ck["steps"] * 4 // data["train_windows"])
        assert rec["recipe"] == json.loads(json.dumps(fam.to_dict()))
        assert rec["architecture"] == ARCH[fam.preset] and rec["preset"] == fam.preset
        assert rec["train"]["history"][-1][0] == ck["steps"]  # the branch ran to its end
        folder = tmp_path / fam.family / rec["name"]
        assert json.loads((folder / "zoo.json").read_text()) == json.loads(json.dumps(rec))
    assert records[-1]["checkpoint"]["max_times_seen"] >= 2  # the 4x checkpoint repeats data
    final = records[-1]
    assert final["train"]["final_loss"] < np.log(320) - 1.0  # it learned: 1 nat below uniform
    assert np.isfinite(final["eval"]["gutenberg_valid"]["nll"])
    folder = tmp_path / fam.family / final["name"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / fam.family / "tokenizer")
    assert type(model).__name__ == ARCH[fam.preset]
    ids = tok("It was the best of times.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    from ptqscale.zoo.evaluate import nll_sum  # the golden NLL recomputes from the folder

    windows = np.asarray(tok("\n\n".join(_test_docs(data)), add_special_tokens=False)
                         ["input_ids"][: 2 * 32]).reshape(2, 32)
    s, n = nll_sum(model, windows)
    assert s / n == pytest.approx(final["golden"]["nll"], abs=1e-5)


def _test_docs(data):
    from ptqscale.zoo.data import gutenberg_documents

    return gutenberg_documents(data["data_dir"], "test")


def test_same_seed_same_weights_and_branches_do_not_disturb_the_run(tiny_data, tmp_path):
    """Retraining gives identical weights; the x1 checkpoint of a run with five branches is
    the x1 of a run with that branch alone (forking copies, never touches, the main run)."""
    fam = tiny("zoo-opt")
    train(fam, tiny_data, tmp_path / "a")
    train(fam, tiny_data, tmp_path / "b")
    train(dataclasses.replace(fam, checkpoints=(1.0,)), tiny_data, tmp_path / "c")
    train(dataclasses.replace(fam, seed=fam.seed + 1), tiny_data, tmp_path / "d")
    one = "zoo-opt/zoo-opt-t-x1"
    a, b, c, d = (weights(tmp_path / x / one) for x in "abcd")
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], d[k]) for k in a)


def test_a_rerun_skips_finished_members_and_pack_writes_manifest(tiny_data, tmp_path):
    fam = tiny("zoo-llama")
    assert len(train(fam, tiny_data, tmp_path / "z")) == 5
    assert train(fam, tiny_data, tmp_path / "z") == []
    info = manifest.pack(tmp_path / "z", tmp_path / "packed", part_mib=0.05)
    members = info["families"]["zoo-llama"]["members"]
    assert [m["revision"] for m in members] == ["x0.25", "x0.5", "x1", "x2", "x4"]
    assert len(info["parts"]) >= 2
    for part in info["parts"]:  # the parts unpack into a folder laid out as --out
        with tarfile.open(tmp_path / "packed" / part) as tar:
            tar.extractall(tmp_path / "unpacked", filter="data")
    for m in members:
        assert sha256_file(tmp_path / "unpacked" / m["folder"] / "model.safetensors") == \
            m["weights_sha256"]
    assert (tmp_path / "unpacked" / "zoo-llama" / "tokenizer" / "tokenizer.json").exists()
    table = (tmp_path / "packed" / "zoo.md").read_text()
    assert "| t | " in table and "x0.25 | x0.5 | x1 | x2 | x4" in table


def test_window_order_repeats_whole_epochs():
    order = factory.window_order(5, 12, seed=3)
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))
    assert not np.array_equal(order[:5], order[5:10])  # a fresh permutation per epoch


def test_schedule_warmup_constant_then_cooldown_to_the_floor():
    fam = load_family("zoo-llama")
    peak = fam.peak_lr("150k")
    assert factory.lr_main(fam, "150k", 0) < factory.lr_main(fam, "150k", fam.warmup_steps) == peak
    start, end = fam.branch_start(1.0), fam.steps(1.0)
    assert end - start == round(0.2 * end)
    assert factory.lr_branch(fam, "150k", 1.0, end - 1) == pytest.approx(0.0)


@pytest.mark.parametrize("changes, needle", [
    ({"preset": "bert"}, "preset"),
    ({"base_tokens": 1000}, "whole number of batches"),
    ({"sizes": {"x": 40}}, "head_dim"),
    ({"warmup_steps": 200}, "warmup_steps"),
    ({"train_dtype": "int8"}, "train_dtype"),
])
def test_bad_recipes_are_refused_naming_the_key(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        dataclasses.replace(load_family("zoo-gpt2"), **changes)


def test_unknown_yaml_keys_and_families_are_refused(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(load_family("zoo-opt").path and open(load_family("zoo-opt").path).read()
                    + "lr_warmup: 3\n")
    with pytest.raises(ConfigError, match="unknown keys \\['lr_warmup'\\]"):
        load_family(path)
    with pytest.raises(ConfigError, match="zoo-gpt2"):
        load_family("zoo-gpt3")


def test_conf_model_entries_are_generated_and_compose_with_the_d_axis(tmp_path):
    from hydra import compose, initialize_config_dir

    from ptqscale.runner.app import conf_dir
    from ptqscale.runner.config import register_configs

    fams = [load_family(n) for n in family_names()]
    written = manifest.write_model_confs(fams, tmp_path)
    conf = manifest.Path(conf_dir()) / "model"
    for path in written:  # committed files are exactly what the generator writes
        assert (conf / path.name).read_text() == path.read_text(), path.name
    assert {p.name for p in conf.glob("zoo-*.yaml")} == {p.name for p in written}
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["model=zoo-neox-150k", "model.revision=x4",
                                           "paths.zoo=/z"])
    assert cfg.model.path == "/z/zoo-neox/zoo-neox-150k-x4"
    assert cfg.model.tokenizer == "/z/zoo-neox/tokenizer" and cfg.model.max_seqlen == 256


@pytest.mark.slow  # two fresh interpreters importing torch and transformers: ~50 s on 2 cores
def test_the_command_trains_families_side_by_side(tiny_data, tmp_path):
    """``train A B --jobs 2``: one process per family (the GPU command's form), each logged."""
    import yaml

    paths = []
    for name in ("zoo-neox", "zoo-gpt2"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny(name, checkpoints=(0.5, 1.0)).to_dict()))
        paths.append(str(path))
    factory.main(["train", *paths, "--data", str(tiny_data["data"]), "--out",
                  str(tmp_path / "out"), "--device", "cpu", "--jobs", "2"])
    info = manifest.manifest(tmp_path / "out")
    assert {f: [m["name"] for m in v["members"]] for f, v in info["families"].items()} == {
        "zoo-neox": ["zoo-neox-t-x0.5", "zoo-neox-t-x1"],
        "zoo-gpt2": ["zoo-gpt2-t-x0.5", "zoo-gpt2-t-x1"]}
    assert "zoo-gpt2-t-x1" in (tmp_path / "out" / "zoo-gpt2.log").read_text()
