"""Fixtures of the metric tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def stories(shared_data):
    """stories260K (float32) and the first 8,000 characters of the TinyStories sample, tokenized."""
    from ptqscale.models import ModelConfig, load_model

    gguf = shared_data / "models" / "stories260K" / "stories260K.gguf"
    text = shared_data / "tinystories-valid-sample" / "tinystories_val.txt"
    if not gguf.is_file() or not text.is_file():
        pytest.skip("stories260K or the TinyStories sample is missing")
    model, tok = load_model(ModelConfig(name="stories260k", path=str(gguf), max_seqlen=512))
    stream = tok(text.read_text()[:8_000], return_tensors="pt").input_ids[0]
    assert next(model.parameters()).dtype == torch.float32
    return model.eval(), stream
