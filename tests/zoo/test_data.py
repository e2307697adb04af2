"""Token streams, their cache, the fixed training order and the evaluation texts."""

from __future__ import annotations

import numpy as np
import pytest

from ptqscale.errors import ConfigError
from ptqscale.zoo.data import (
    EOS,
    gather_windows,
    gptq_windows,
    read_books,
    token_stream,
    train_order,
    wikitext_documents,
)
from ptqscale.zoo.tokenizer import load_tokenizer, train_tokenizer


def test_stream_is_books_each_ended_by_eos(tiny_data, tmp_path):
    tok = load_tokenizer()
    ids, info = token_stream(tok, tiny_data["data"], "train", tmp_path)
    books = list(read_books(tiny_data["data"], "train"))
    expected = []
    for book in books:
        expected += tok.encode(book, add_special_tokens=False).ids + [tok.token_to_id(EOS)]
    assert ids.dtype == np.uint16 and ids.tolist() == expected
    assert info["books"] == 3 and info["tokens"] == len(expected)
    assert sorted(info["sources"]) == ["train-00.jsonl.xz", "train-01.jsonl.xz"]


def test_cache_is_keyed_by_tokenizer(tiny_data, tmp_path, test_books):
    tok = load_tokenizer()
    a, info_a = token_stream(tok, tiny_data["data"], "valid", tmp_path)
    again, _ = token_stream(tok, tiny_data["data"], "valid", tmp_path)
    assert np.array_equal(a, again) and len(list(tmp_path.iterdir())) == 1
    other = train_tokenizer([test_books[0][:30000]], 400)
    b, info_b = token_stream(other, tiny_data["data"], "valid", tmp_path)
    assert len(list(tmp_path.iterdir())) == 2 and info_a["sha256_tokens"] != info_b["sha256_tokens"]


def test_order_is_a_fixed_permutation_without_repeats():
    starts = train_order(10_001, 100, 60, seed=0)
    assert np.array_equal(starts, train_order(10_001, 100, 60, seed=0))
    assert len(set(starts.tolist())) == 60 and all(s % 100 == 0 for s in starts)
    assert starts.max() + 101 <= 10_001
    assert not np.array_equal(starts, train_order(10_001, 100, 60, seed=1))
    # asking for fewer windows gives a prefix of the same order (every budget, same data)
    assert np.array_equal(train_order(10_001, 100, 20, seed=0), starts[:20])


def test_order_refuses_more_windows_than_the_split_holds():
    with pytest.raises(ConfigError, match="holds 99"):
        train_order(9_950, 100, 100, seed=0)


def test_windows_shift_targets_by_one():
    tokens = np.arange(50, dtype=np.uint16)
    w = gather_windows(tokens, np.array([20, 0]), 8)
    assert w.shape == (2, 9) and w[0, 0] == 20 and w[0, -1] == 28 and w[1, -1] == 8
    g = gptq_windows(tokens, 16)
    assert g.shape == (3, 16) and g[-1, -1] == 47  # remainder (2 tokens) dropped


def test_wikitext_rows_follow_the_hf_loader(shared_data):
    rows = wikitext_documents(shared_data / "wikitext-2-raw" / "wiki.test.raw")
    assert len(rows) == 4358  # the file's line count, as in torchtext / HF
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert all(r == "" or r.strip() for r in rows)
