"""Keys cover what is loaded: other files under the same name never share a key or a cache.

Copies of the embedded 200k member and of the Gutenberg test split are changed by one value;
the unchanged copies keep the name's key (as every committed store does), the changed ones
get keys (and full-precision cache keys) of their own, with one warning line.
"""

from __future__ import annotations

import logging
import lzma
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ptqscale.assets import DATA, ZOO_CHECKPOINTS
from ptqscale.runner import identity, keys
from ptqscale.runner.job import _base_record, validate_job

MEMBER = "gutenberg-llama-200k"


@pytest.fixture
def weights(tmp_path):
    """(unchanged copy, copy with one weight changed) of the 200k member."""
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(Path(ZOO_CHECKPOINTS) / MEMBER, same)
    shutil.copytree(Path(ZOO_CHECKPOINTS) / MEMBER, other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] += 0.01
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    return same, other


def _spec(composed, results, *extra, bind=True):
    cfg = composed([f"model={MEMBER}", "data=gutenberg", "method=rtn", "format=int8",
                    f"paths.results={results}", *extra])
    return validate_job(cfg, bind=bind)


def test_other_weights_under_the_same_name_get_their_own_keys(composed, tmp_path, weights,
                                                              caplog):
    results = tmp_path / "results"
    same, other = weights
    first = _spec(composed, results)                                   # binds the name
    assert first.files == {} and (results / "_identity").is_dir()
    assert _spec(composed, results, f"model.path={same}").key == first.key
    with caplog.at_level(logging.WARNING, logger="ptqscale"):
        changed = _spec(composed, results, f"model.path={other}")
    assert changed.key != first.key and set(changed.files) == {"model"}
    assert (keys.fp_eval_key(changed.model, changed.data, changed.eval, changed.files)
            != keys.fp_eval_key(first.model, first.data, first.eval, first.files))
    notes = [r.getMessage() for r in caplog.records if "differ from those" in r.getMessage()]
    assert len(notes) == 1 and str(other) in notes[0]
    record = _base_record(changed, composed([f"model={MEMBER}"]))
    assert record["identity"]["keyed_by_files"] == ["model"]
    assert record["identity"]["model"] == identity.model_fingerprint(changed.model)


def test_a_changed_corpus_file_gets_its_own_key(composed, tmp_path):
    results = tmp_path / "results"
    corpus = tmp_path / "corpus"
    shutil.copytree(Path(DATA) / "gutenberg-en", corpus)
    first = _spec(composed, results, f"data.path={corpus}")
    assert first.files == {}
    test = corpus / "test.jsonl.xz"
    lines = lzma.decompress(test.read_bytes()).decode().splitlines(keepends=True)
    test.write_bytes(lzma.compress("".join(lines[:-1]).encode()))      # one book fewer
    changed = _spec(composed, results, f"data.path={corpus}")
    assert changed.key != first.key and set(changed.files) == {"data"}


def test_planning_binds_nothing_and_the_first_binding_wins(composed, tmp_path, weights):
    results = tmp_path / "results"
    same, other = weights
    plan = _spec(composed, results, f"model.path={other}", bind=False)
    assert not (results / "_identity").exists() and plan.files == {}
    a = identity.bind(str(results), "model", "x", "fp-a", "a")
    b = identity.bind(str(results), "model", "x", "fp-b", "b")
    assert a == b == "fp-a"


def test_fingerprints_read_the_content_and_are_memoised(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"\0" * 1000)
    a = identity.file_digest(f)
    f.write_bytes(b"\0" * 999 + b"\1")
    assert identity.file_digest(f) != a
    big = tmp_path / "big.bin"  # sampled above FULL_HASH_MAX: size, head and spread chunks
    with open(big, "wb") as g:
        g.truncate(identity.FULL_HASH_MAX + (1 << 20))
    d0 = identity.file_digest(big)
    with open(big, "r+b") as g:
        g.seek(identity.FULL_HASH_MAX // 2)
        g.write(b"\1" * identity.CHUNK)
    assert identity.file_digest(big) != d0
