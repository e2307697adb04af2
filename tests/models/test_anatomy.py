"""The anatomy of tiny random checkpoints of every supported family, loaded from disk."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_CONFIGS
from torch import nn

from ptqscale.models import (
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    UnsupportedArchitectureError,
    count_parameters,
    get_anatomy,
    load_model,
    replace_conv1d,
)

_LLAMA = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
_NEOX = ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
# MoE: one Linear per expert matrix (4 experts), experts in index order; routers not targets
_EXPERTS = [f"mlp.experts.{k}.{m}" for k in range(4) for m in ("gate_proj", "up_proj", "down_proj")]
_SHARED = ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
           "mlp.shared_expert.down_proj"]
# family: (block prefix, targets of a block in call order, embeddings, head, tied)
EXPECTED = {
    "llama": ("model.layers", _LLAMA, ["model.embed_tokens"], False),
    "mistral": ("model.layers", _LLAMA, ["model.embed_tokens"], False),
    "qwen2": ("model.layers", _LLAMA, ["model.embed_tokens"], False),
    "qwen3": ("model.layers", _LLAMA, ["model.embed_tokens"], False),
    "gemma": ("model.layers", _LLAMA, ["model.embed_tokens"], True),
    "gemma2": ("model.layers", _LLAMA, ["model.embed_tokens"], True),
    "opt": ("model.decoder.layers",
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
             "fc1", "fc2"],
            ["model.decoder.embed_tokens", "model.decoder.embed_positions"], True),
    "gpt2": ("transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
             ["transformer.wte", "transformer.wpe"], True),
    "gpt_neox": ("gpt_neox.layers", _NEOX, ["gpt_neox.embed_in"], False),
    "bloom": ("transformer.h", ["self_attention.query_key_value", "self_attention.dense",
                                "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
              ["transformer.word_embeddings"], True),
    "phi": ("model.layers", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.dense", "mlp.fc1", "mlp.fc2"], ["model.embed_tokens"],
            False),
    "phi3": ("model.layers", ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                              "mlp.down_proj"], ["model.embed_tokens"], False),
    "falcon": ("transformer.h", ["self_attention.query_key_value", "self_attention.dense",
                                 "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
               ["transformer.word_embeddings"], True),
    "stablelm": ("model.layers", _LLAMA, ["model.embed_tokens"], False),
    "mixtral": ("model.layers", _LLAMA[:4] + _EXPERTS, ["model.embed_tokens"], False),
    "qwen2_moe": ("model.layers", _LLAMA[:4] + _SHARED + _EXPERTS, ["model.embed_tokens"], False),
    "qwen3_moe": ("model.layers", _LLAMA[:4] + _EXPERTS, ["model.embed_tokens"], False),
}


def test_every_supported_architecture_has_a_tiny_config_and_expectation():
    assert set(SUPPORTED_ARCHITECTURES) == set(TINY_CONFIGS) == set(EXPECTED)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_anatomy_of_tiny_checkpoint(family, tiny_checkpoint):
    folder, reference = tiny_checkpoint(family)
    model, tokenizer = load_model(ModelConfig(name=family, path=folder, device="cpu"))
    prefix, block, embeddings, tied = EXPECTED[family]
    anat = get_anatomy(model)

    assert anat.architecture == family and anat.block_prefix == prefix
    assert len(anat.blocks) == 2 and anat.context_length in (256, 2048)
    expected = [f"{prefix}.{i}.{rel}" for i in range(2) for rel in block]
    assert list(anat.targets) == expected  # names, count, block order and call order
    assert list(anat.block_targets(1)) == expected[len(block):]
    # plain Linears (falcon's FalconLinear is one: a Linear whose forward is x @ W.T + b)
    assert all(type(m) is nn.Linear or type(m).__name__ == "FalconLinear"
               for m in anat.targets.values())
    assert anat.embeddings == embeddings and anat.head == "lm_head" and anat.tied_head == tied
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # the loaded model computes what the in-memory model computes (Conv1D swap included)
    ids = torch.tensor([tokenizer("Hello, tiny world!").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi", "falcon", "qwen2_moe"])
def test_count_parameters_splits_the_total(family, tiny_checkpoint):
    folder, _ = tiny_checkpoint(family)
    model, _ = load_model(ModelConfig(name=family, path=folder, device="cpu"))
    anat = get_anatomy(model)
    counts = count_parameters(model, anat)
    # independent count: by parameter name, each tensor once (tied weights are one tensor)
    named = dict(model.named_parameters())  # named_parameters already drops tied duplicates
    by_prefix = {
        "embedding": sum(p.numel() for n, p in named.items()
                         if any(n.startswith(e + ".") for e in anat.embeddings)),
        "blocks": sum(p.numel() for n, p in named.items() if n.startswith(anat.block_prefix + ".")),
        "head": sum(p.numel() for n, p in named.items() if n.startswith("lm_head.")),
    }
    assert counts["total"] == sum(p.numel() for p in named.values())
    assert {k: counts[k] for k in by_prefix} == by_prefix
    assert counts["quantizable"] == sum(m.weight.numel() for m in anat.targets.values())
    assert counts["quantizable"] < counts["blocks"] < counts["total"]
    if anat.tied_head:
        assert counts["head"] == 0


def test_unsupported_architecture_lists_the_supported_ones():
    import transformers as T

    model = T.AutoModelForCausalLM.from_config(
        T.GPTJConfig(n_embd=32, n_layer=1, n_head=4, vocab_size=64, rotary_dim=4)
    )
    with pytest.raises(UnsupportedArchitectureError, match="'gptj'.*llama"):
        get_anatomy(model)


def test_replace_conv1d_keeps_gpt2_outputs():
    import transformers as T

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS["gpt2"]()).eval()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        before = model(ids).logits
        assert replace_conv1d(model) == 8  # 4 per block
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="out of range"):
        get_anatomy(model).block_targets(2)


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2"])
def test_anatomy_on_the_meta_device_asks_no_mask_values(family, monkeypatch):
    """Skeletons (plans, validation) probe the call order on the meta device. transformers
    5.17's sdpa mask read the padding mask's values (``.item()``), which failed every OPT job
    on the GPU machine; the probe must ask no such question, and leave the attention as it was."""
    import transformers.masking_utils as mu
    from transformers import AutoModelForCausalLM

    def reads_values(*args, **kwargs):   # 5.17 read the (meta) padding mask's values here
        return torch.ones(1, device="meta").item()

    monkeypatch.setattr(mu, "_ignore_causal_mask_sdpa", reads_values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family]())
    attn = model.config._attn_implementation
    prefix, block, _, _ = EXPECTED[family]
    replace_conv1d(model)
    anat = get_anatomy(model)
    assert list(anat.targets) == [f"{prefix}.{i}.{rel}" for i in range(2) for rel in block]
    assert model.config._attn_implementation == attn
