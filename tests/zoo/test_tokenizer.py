"""The family tokenizer: exact round trips, the HF wrapper, a deterministic fit."""

from __future__ import annotations

import pytest

from ptqscale.zoo.data import EOS, tokenizer_corpus
from ptqscale.zoo.tokenizer import FAMILY_TOKENIZER, hf_tokenizer, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _samples(books: list[str]) -> list[str]:
    # beginnings (title pages), middles and ends of every test book, plus awkward strings
    out = []
    for book in books:
        n = len(book)
        out += [book[:3000], book[n // 2: n // 2 + 3000], book[-3000:]]
    out += ["  two leading spaces\n\n\n\tand a tab", "naïve café — “quotes” … ½ 東京 🙂",
            "", " ", "\r\n", "_italics_ [Illustration] <|endoftext|> literal"]
    return out


def test_family_tokenizer_has_the_configured_vocabulary(tok):
    assert FAMILY_TOKENIZER.is_file()
    assert tok.get_vocab_size() == 8192 and tok.token_to_id(EOS) == 0


def test_round_trip_is_exact_on_gutenberg_text(tok, test_books):
    for text in _samples(test_books):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_bpe_compresses_english(tok, test_books):
    text = test_books[0][:20000]
    assert len(text) / len(tok.encode(text).ids) > 3.0  # chars per token; bytes would be 1


def test_hf_wrapper_saves_and_reloads_offline(tok, test_books, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_tokenizer(tok).save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token == hf.bos_token == EOS
    for text in _samples(test_books[:2]):
        ids = hf(text)["input_ids"]  # no BOS/EOS added: the protocol scores raw text
        assert ids == tok.encode(text, add_special_tokens=False).ids
        assert hf.decode(ids) == text


def test_fit_is_deterministic_and_sized(test_books):
    texts = [b[:20000] for b in test_books[:4]]
    a, b = train_tokenizer(texts, 600), train_tokenizer(list(texts), 600)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 600
    assert a.decode(a.encode(texts[0]).ids) == texts[0]


def test_fit_subset_is_a_prefix_of_every_book(tiny_data):
    full = tokenizer_corpus(tiny_data["data"], 10**9)
    half = tokenizer_corpus(tiny_data["data"], sum(map(len, full)) // 2)
    assert len(half) == len(full) == 3
    for h, f in zip(half, full):
        assert f.startswith(h) and 0.4 * len(f) < len(h) <= 0.5 * len(f) + 1
        assert h.endswith("\n")  # cut at a line end
