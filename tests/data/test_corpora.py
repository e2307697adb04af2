"""Named corpora from local files reproduce the hub datasets' rows; bad inputs fail early."""

from __future__ import annotations

import hashlib
import json
import lzma

import pytest

from ptqscale.data import (
    CORPORA,
    DataConfig,
    DataError,
    join_documents,
    load_documents,
    validate_data_config,
)

WIKI_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


def test_wikitext2_rows_are_the_hub_rows(shared_data):
    folder = shared_data / "wikitext-2-raw"
    raw = (folder / "wiki.test.raw").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == WIKI_TEST_SHA256
    docs = load_documents(DataConfig("wikitext2", "test", path=str(folder)))
    # wikitext-2-raw-v1 test: 4358 rows; row 0 is "", row 1 the first title with its newline
    assert len(docs) == 4358 and docs[:2] == ["", " = Robert Boulter = \n"]
    assert all(d == "" or (d.endswith("\n") and d.strip()) for d in docs)
    # independent reconstruction: blank lines (" \n") are "" rows, every other line kept whole
    lines = raw.decode("utf-8").split("\n")[:-1]
    expected = "\n\n".join(line + "\n" if line.strip() else "" for line in lines)
    assert join_documents(DataConfig("wikitext2", "test", path=str(folder)), docs) == expected
    valid = load_documents(DataConfig("wikitext2", "validation", path=str(folder)))
    assert len(valid) == 3760


def test_ptb_rows_are_stripped_lines_joined_by_space(shared_data):
    cfg = DataConfig("ptb", "test", path=str(shared_data / "ptb"))
    docs = load_documents(cfg)
    assert len(docs) == 3761 and docs[0] == "no it was n't black monday"
    assert join_documents(cfg, docs).startswith("no it was n't black monday but while")


def test_gutenberg_books_from_jsonl_xz(shared_data):
    docs = load_documents(DataConfig("gutenberg", "test", path=str(shared_data / "gutenberg-en")))
    assert len(docs) == 12
    assert sum(len(d) for d in docs) == 5_633_317  # SOURCE.md: test split characters


def test_tinystories_split_on_blank_lines(shared_data):
    docs = load_documents(DataConfig("tinystories", "valid",
                                     path=str(shared_data / "tinystories-valid-sample")))
    assert docs[0].startswith("Spot. Spot saw the shiny car")
    assert all(d == d.strip() and "\n\n" not in d for d in docs)


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("second file")
    assert load_documents(DataConfig("text", path=str(tmp_path))) == ["first file", "second file"]
    rows = [{"body": "one"}, {"body": "two"}]
    with lzma.open(tmp_path / "docs.jsonl.xz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig("jsonl", path=str(tmp_path / "docs.jsonl.xz"), text_field="body",
                     max_documents=1)
    assert load_documents(cfg) == ["one"]
    with pytest.raises(DataError, match="no field 'text'"):
        load_documents(DataConfig("jsonl", path=str(tmp_path / "docs.jsonl.xz")))


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="wikitext"), r"unknown corpus 'wikitext' \(did you mean 'wikitext2'"),
    (dict(name="wikitext2", split="dev"), "not a split of wikitext2"),
    (dict(name="gutenberg", split="test"), "no hub source; set data.path"),
    (dict(name="ptb", max_documents=0), "max_documents=0"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(DataError, match=match):
        DataConfig(**kwargs)


def test_bad_paths_fail_before_reading(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        validate_data_config(DataConfig("wikitext2", "test", path=str(tmp_path / "nope")))
    with pytest.raises(DataError, match=r"no file matching \['wiki.test.raw'\]"):
        validate_data_config(DataConfig("wikitext2", "test", path=str(tmp_path)))
    (tmp_path / "wiki.test.raw").write_text("")
    with pytest.raises(DataError, match="corpus file is empty"):
        validate_data_config(DataConfig("wikitext2", "test", path=str(tmp_path)))
    (tmp_path / "blank.txt").write_text(" \n\n \n")
    with pytest.raises(DataError, match="holds only whitespace"):
        load_documents(DataConfig("text", path=str(tmp_path / "blank.txt")))


def test_unknown_key_is_fatal_in_the_structured_schema():
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    schema = OmegaConf.structured(DataConfig(name="wikitext2"))
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(schema, {"spilt": "valid"})


@pytest.mark.parametrize("name, split, call, n", [
    ("wikitext2", "test", (("Salesforce/wikitext", "wikitext-2-raw-v1"),
                           {"split": "test", "revision": None}), 3),
    ("ptb", "valid", (("ptb-text-only/ptb_text_only", "penn_treebank"),
                      {"split": "validation", "revision": "refs/convert/parquet"}), 3),
    ("c4", "validation", (("allenai/c4",), {"split": "validation", "data_files": {
        "validation": "en/c4-validation.00000-of-00008.json.gz"}}), 1100),
    ("tinystories", "valid", (("roneneldan/TinyStories", None),
                              {"split": "validation", "revision": None}), 3),
])
def test_hub_is_used_when_no_path_is_given(monkeypatch, name, split, call, n):
    import datasets

    calls = []
    column = CORPORA[name].hub[2]

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return {column: [f"doc {i}" for i in range(2000 if name == "c4" else 3)]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = load_documents(DataConfig(name, split))
    assert calls == [call]
    assert len(docs) == n  # c4: GPTQ's first 1100 validation documents
