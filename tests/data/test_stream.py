"""Token streams (tokenizer cross-check, disk cache) and the calibration sampler."""

from __future__ import annotations

import os
import random
import shutil

import pytest
import torch

import ptqscale.data.stream as stream_mod
from ptqscale.data import (
    CalibConfig,
    DataConfig,
    DataError,
    hash_tokens,
    sample_calibration,
    tokenize_corpus,
)
from ptqscale.errors import ConfigError


@pytest.fixture(scope="module")
def gpt2_tokenizer(shared_data):
    return _gpt2(shared_data)


def _gpt2(shared_data):
    # transformers 5 takes the two files as vocab= / merges= (vocab_file= is ignored there)
    from transformers import GPT2Tokenizer

    folder = shared_data / "tokenizers" / "gpt2"
    tok = GPT2Tokenizer(vocab=str(folder / "encoder.json"), merges=str(folder / "vocab.bpe"))
    assert len(tok) == 50257
    return tok


@pytest.fixture
def wiki(shared_data):
    return DataConfig("wikitext2", "test", path=str(shared_data / "wikitext-2-raw"))


def test_wikitext2_stream_matches_tiktoken(shared_data, gpt2_tokenizer, wiki, tmp_path,
                                           monkeypatch):
    """Two BPE implementations (HF tokenizers, tiktoken) give the same WikiText-2 test stream."""
    tiktoken = pytest.importorskip("tiktoken")
    src = shared_data / "tokenizers" / "gpt2"
    cache = tmp_path / "tiktoken"  # file names tiktoken expects: sha1 of the download URL
    cache.mkdir()
    shutil.copy(src / "vocab.bpe", cache / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee")
    shutil.copy(src / "encoder.json", cache / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    enc = tiktoken.get_encoding("gpt2")
    assert enc.encode_ordinary("Hello world") == [15496, 995]

    ours = tokenize_corpus(wiki, gpt2_tokenizer, str(tmp_path / "c"))
    lines = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text().split("\n")[:-1]
    text = "\n\n".join(line + "\n" if line.strip() else "" for line in lines)
    theirs = enc.encode_ordinary(text)
    assert ours.dtype == torch.long and ours.tolist() == theirs
    assert len(theirs) > 286_221  # more than the raw file's count: the joins add newlines


def test_stream_is_cached_by_tokenizer_corpus_and_preset(wiki, gpt2_tokenizer, tmp_path,
                                                         monkeypatch):
    cfg = DataConfig("ptb", "test", path=wiki.path.replace("wikitext-2-raw", "ptb"),
                     max_documents=200)
    first = tokenize_corpus(cfg, gpt2_tokenizer, str(tmp_path))
    files = sorted(os.listdir(tmp_path / "streams"))
    assert len(files) == 2 and files[0].startswith("ptb-test-")  # .json + .npy

    def no_reading(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(stream_mod, "load_documents", no_reading)
    assert torch.equal(tokenize_corpus(cfg, gpt2_tokenizer, str(tmp_path)), first)
    monkeypatch.undo()
    tokenize_corpus(cfg, gpt2_tokenizer, str(tmp_path), preset="rolling")
    other = DataConfig("ptb", "test", path=cfg.path, max_documents=100)
    assert tokenize_corpus(other, gpt2_tokenizer, str(tmp_path)).numel() < first.numel()
    assert len(os.listdir(tmp_path / "streams")) == 6
    with pytest.raises(DataError, match="unknown preset"):
        tokenize_corpus(cfg, gpt2_tokenizer, str(tmp_path), preset="lm-eval")



def test_a_corrupt_cached_stream_is_moved_aside_and_tokenized_again(wiki, gpt2_tokenizer,
                                                                    tmp_path, caplog):
    cfg = DataConfig("ptb", "test", path=wiki.path.replace("wikitext-2-raw", "ptb"),
                     max_documents=50)
    first = tokenize_corpus(cfg, gpt2_tokenizer, str(tmp_path))
    (npy,) = (tmp_path / "streams").glob("*.npy")
    npy.write_bytes(npy.read_bytes()[:100])     # truncated
    with caplog.at_level("WARNING", "ptqscale"):
        assert torch.equal(tokenize_corpus(cfg, gpt2_tokenizer, str(tmp_path)), first)
    assert str(npy) in caplog.text and len(list(npy.parent.glob(f"{npy.name}.corrupt-*"))) == 1
    assert torch.equal(tokenize_corpus(cfg, gpt2_tokenizer, str(tmp_path)), first)

def test_cache_key_changes_with_the_tokenizer(shared_data, gpt2_tokenizer):
    fresh = _gpt2(shared_data)
    base = stream_mod.tokenizer_fingerprint(gpt2_tokenizer)
    assert stream_mod.tokenizer_fingerprint(fresh) == base
    fresh.add_tokens(["<extra>"])
    assert stream_mod.tokenizer_fingerprint(fresh) != base


def test_calibration_draw_is_gptq_s_and_hashed(shared_data, gpt2_tokenizer, tmp_path):
    ptb = DataConfig("ptb", "test", path=str(shared_data / "ptb"), max_documents=300)
    cfg = CalibConfig(data=ptb, nsamples=6, seqlen=64, seed=3)
    samples, digest = sample_calibration(cfg, gpt2_tokenizer, str(tmp_path))
    stream = tokenize_corpus(ptb, gpt2_tokenizer, str(tmp_path))
    rng = random.Random(3)  # GPTQ: random.seed(seed); randint(0, len - seqlen - 1) per sample
    starts = [rng.randint(0, stream.numel() - 64 - 1) for _ in range(6)]
    assert torch.equal(samples, torch.stack([stream[i:i + 64] for i in starts]))
    assert digest == hash_tokens(samples) and len(digest) == 64
    again, digest2 = sample_calibration(cfg, gpt2_tokenizer, str(tmp_path))
    assert digest2 == digest and torch.equal(again, samples)
    _, other = sample_calibration(CalibConfig(data=ptb, nsamples=6, seqlen=64, seed=4),
                                  gpt2_tokenizer, str(tmp_path))
    assert other != digest


def test_calibration_errors(wiki, gpt2_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="nsamples=0"):
        CalibConfig(data=wiki, nsamples=0)
    with pytest.raises(ConfigError, match="seqlen=1"):
        CalibConfig(data=wiki, seqlen=1)
    (tmp_path / "tiny.txt").write_text("just a few words")
    tiny = CalibConfig(data=DataConfig("text", path=str(tmp_path / "tiny.txt")), seqlen=64)
    with pytest.raises(DataError, match="fewer than seqlen"):
        sample_calibration(tiny, gpt2_tokenizer, None)
