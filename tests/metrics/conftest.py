"""Fixtures of the metric tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def stories_tokens(shared_data):
    """stories260K (float32, eval mode) and a function that tokenizes the first ``chars``
    characters of the TinyStories sample (in-domain text)."""
    from ptqscale.models import ModelConfig, load_model

    gguf = shared_data / "models" / "stories260K" / "stories260K.gguf"
    text = shared_data / "tinystories-valid-sample" / "tinystories_val.txt"
    if not gguf.is_file() or not text.is_file():
        pytest.skip("stories260K or the TinyStories sample is missing")
    model, tok = load_model(ModelConfig(name="stories260k", path=str(gguf), max_seqlen=512))
    assert next(model.parameters()).dtype == torch.float32
    return model.eval(), lambda chars: tok(text.read_text()[:chars],
                                           return_tensors="pt").input_ids[0]


@pytest.fixture(scope="module")
def stories(stories_tokens):
    """stories260K and the first 8,000 characters of the TinyStories sample, tokenized."""
    model, tokens = stories_tokens
    return model, tokens(8_000)


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    """A random two-layer Llama of 64 ids (eval mode, seeded; one per test module): gradients
    in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
