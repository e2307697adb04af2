"""load_model's checks: each bad input is a clear ConfigError before any weight is read."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import save_tiny

from ptqscale.errors import ConfigError
from ptqscale.models import (
    ModelConfig,
    ModelNotFoundError,
    UnsafeCheckpointError,
    get_anatomy,
    load_model,
    validate_model_config,
)


def _pickle_only(folder):
    model = save_tiny("llama", folder)
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    return model


def test_nonexistent_path():
    with pytest.raises(ModelNotFoundError, match="does not exist: /no/such/model"):
        load_model(ModelConfig(name="x", path="/no/such/model"))
    with pytest.raises(ModelNotFoundError, match="GGUF file does not exist"):
        load_model(ModelConfig(name="x", path="/no/such/model.gguf"))


def test_folder_without_weights(tmp_path):
    save_tiny("llama", tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match=r"no weights in .*expected \*\.safetensors"):
        validate_model_config(ModelConfig(name="x", path=str(tmp_path)))


def test_folder_without_tokenizer(tmp_path):
    save_tiny("llama", tmp_path)
    for f in os.listdir(tmp_path):
        if f.startswith(("tokenizer", "special_tokens")):
            os.remove(tmp_path / f)
    with pytest.raises(ModelNotFoundError, match="no tokenizer in .*set model.tokenizer"):
        validate_model_config(ModelConfig(name="x", path=str(tmp_path)))


def test_pickle_only_checkpoint_is_refused_unless_allowed(tmp_path):
    reference = _pickle_only(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="only pickle weights.*allow_pickle=true"):
        load_model(ModelConfig(name="x", path=str(tmp_path)))
    model, _ = load_model(ModelConfig(name="x", path=str(tmp_path), allow_pickle=True))
    ids = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_a_path_that_is_a_file_or_not_gguf(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        validate_model_config(ModelConfig(name="x", path=str(f)))
    g = tmp_path / "fake.gguf"
    g.write_bytes(b"NOPE" + b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match="magic bytes"):
        validate_model_config(ModelConfig(name="x", path=str(g)))


def test_hub_ids_are_not_checked_locally():
    assert validate_model_config(ModelConfig(name="x", path="facebook/opt-125m")).kind == "hub"
    assert validate_model_config(ModelConfig(name="x", path="gpt2")).kind == "hub"
    with pytest.raises(ModelNotFoundError):  # three parts cannot be a hub id: a missing path
        validate_model_config(ModelConfig(name="x", path="a/b/c"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="bfloat"), "did you mean 'bfloat16'"),
    (dict(device="gpu"), "auto, cpu, mps, cuda"),
    (dict(max_seqlen=1), "max_seqlen=1 must be >= 2"),
    (dict(path=""), "model.path must be a non-empty"),
])
def test_bad_values_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{"name": "x", "path": "gpt2", **kwargs})


def test_unknown_config_key_is_fatal_in_the_structured_schema():
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    schema = OmegaConf.structured(ModelConfig(name="x", path="gpt2"))
    with pytest.raises(ConfigKeyError, match="max_seqlne"):
        OmegaConf.merge(schema, {"max_seqlne": 512})
    merged = OmegaConf.to_object(OmegaConf.merge(schema, {"max_seqlen": 64}))
    assert isinstance(merged, ModelConfig) and merged.max_seqlen == 64


def test_max_seqlen_sets_the_context_and_cannot_exceed_the_checkpoint(tmp_path):
    save_tiny("llama", tmp_path)  # max_position_embeddings 256
    model, _ = load_model(ModelConfig(name="x", path=str(tmp_path), max_seqlen=64))
    assert get_anatomy(model).context_length == 64
    with pytest.raises(ConfigError, match="max_seqlen=512 exceeds the checkpoint's context 256"):
        load_model(ModelConfig(name="x", path=str(tmp_path), max_seqlen=512))


def test_dtype_comes_from_config(tmp_path):
    save_tiny("qwen2", tmp_path)
    model, _ = load_model(ModelConfig(name="x", path=str(tmp_path), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
