"""stories260K (a real pretrained Llama in GGUF, with its own 512-token tokenizer) end to end.

Golden values were measured once with this code (CPU, fp32) and are kept here so that any change
to loading, tokenization or the perplexity protocol shows up. Whole-corpus values at seqlen 512
(gptq preset), measured the same way: TinyStories sample 392,080 tokens, 765 windows,
NLL 1.6224138940664732; WikiText-2 test 815,070 tokens, 1591 windows, NLL 4.8067582426430056.
The whole of WikiText-2 takes minutes on 2 CPU cores, so its test uses the first 8192 tokens.
"""

from __future__ import annotations

import re

import pytest
import torch

from ptqscale.data import DataConfig, tokenize_corpus
from ptqscale.errors import ConfigError
from ptqscale.metrics import EvalConfig, measure_perplexity
from ptqscale.models import ModelConfig, count_parameters, get_anatomy, load_model


@pytest.fixture(scope="module")
def stories(shared_data):
    path = shared_data / "models" / "stories260K" / "stories260K.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    model, tok = load_model(ModelConfig(name="stories260k", path=str(path), max_seqlen=512,
                                        device="cpu"))
    return model, tok, path


def test_loads_with_the_published_shape(stories):
    model, tok, _ = stories
    anat = get_anatomy(model)
    assert anat.architecture == "llama" and anat.context_length == 512
    assert len(anat.blocks) == 5 and len(anat.targets) == 5 * 7
    assert model.config.pad_token_id is None  # the file's 4294967295 means "none"
    # SOURCE.md: dim 64, 8 heads / 4 KV heads of 8, FFN 172, vocab 512, untied head
    dim, kv, ffn, vocab = 64, 4 * 8, 172, 512
    per_block = 2 * dim * dim + 2 * dim * kv + 3 * dim * ffn
    counts = count_parameters(model, anat)
    assert counts["quantizable"] == 5 * per_block
    assert counts["blocks"] == 5 * (per_block + 2 * dim)  # + two RMSNorm weights
    assert counts["embedding"] == counts["head"] == vocab * dim
    assert counts["total"] == counts["blocks"] + 2 * vocab * dim + dim  # + final norm
    assert len(tok) == vocab and tok.bos_token_id == 1 and tok.eos_token_id == 2


def test_tokenizer_matches_transformers_gguf_path(stories, shared_data, monkeypatch):
    """Our GGUF tokenizer == transformers' own, once its reader drops the bad padding id."""
    import transformers.integrations.gguf.reader as reader
    from transformers import AutoTokenizer

    _, tok, path = stories
    original = reader.read_gguf_metadata

    def without_padding_id(*args, **kwargs):
        meta, names = original(*args, **kwargs)
        meta.pop("tokenizer.ggml.padding_token_id", None)
        return meta, names

    monkeypatch.setattr(reader, "read_gguf_metadata", without_padding_id)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = (shared_data / "tinystories-valid-sample" / "tinystories_val.txt").read_text()[:50_000]
    text += " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : <unk> 1945 @-@ ü"
    assert tok(text).input_ids == theirs(text).input_ids
    assert tok(text).input_ids[0] == 1  # BOS, as llama.cpp adds it


def test_matches_the_independent_numpy_forward_of_source_md(stories, shared_data):
    """SOURCE.md: a from-scratch numpy forward gives mean NLL 1.439 on 200 paragraphs (19,380
    tokens) of the TinyStories sample, each paragraph tokenized with BOS and fully scored."""
    model, tok, _ = stories
    text = (shared_data / "tinystories-valid-sample" / "tinystories_val.txt").read_text()
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()][:200]
    total, count = 0.0, 0
    with torch.no_grad():
        for p in paragraphs:
            ids = torch.tensor([tok(p.strip()).input_ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            total -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    assert count == 19_380
    assert total / count == pytest.approx(1.439, abs=5e-4)


@pytest.mark.parametrize("corpus, folder, split, nll, nll_sum", [
    ("tinystories", "tinystories-valid-sample", "valid", 1.3786450000852093, 11271.801520696672),
    ("wikitext2", "wikitext-2-raw", "test", 4.681098673751124, 38272.66275658919),
])
def test_golden_nll_gptq_seqlen512_first_8192_tokens(stories, shared_data, corpus, folder, split,
                                                     nll, nll_sum):
    model, tok, _ = stories
    stream = tokenize_corpus(DataConfig(corpus, split, path=str(shared_data / folder)), tok, None)
    res = measure_perplexity(model, stream, EvalConfig(seqlen=512, batch_size=8, max_tokens=8192))
    assert (res.windows, res.tokens) == (16, 16 * 511)
    assert res.nll == pytest.approx(nll, abs=1e-4)
    assert res.nll_sum == pytest.approx(nll_sum, rel=1e-5)


@pytest.mark.slow
def test_golden_nll_whole_tinystories_sample(stories, shared_data):
    model, tok, _ = stories
    cfg = DataConfig("tinystories", "valid", path=str(shared_data / "tinystories-valid-sample"))
    stream = tokenize_corpus(cfg, tok, None)
    assert stream.numel() == 392_080
    res = measure_perplexity(model, stream, EvalConfig(seqlen=512, batch_size=8))
    assert (res.windows, res.tokens) == (765, 765 * 511)
    assert res.nll == pytest.approx(1.6224138940664732, abs=1e-4)


def test_seqlen_above_max_seqlen_is_refused_before_any_forward(stories):
    model, _, _ = stories
    with pytest.raises(ConfigError, match="seqlen=1024 exceeds the model's context 512"):
        measure_perplexity(model, torch.zeros(4096, dtype=torch.long), EvalConfig(seqlen=1024))
    with pytest.raises(ConfigError, match="tokenizer does not match the model"):
        measure_perplexity(model, torch.full((600,), 50_000), EvalConfig(seqlen=512))
