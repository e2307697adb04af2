"""Stand-ins: a family member replaced by a tiny randomly initialised model of its architecture.

``model.stand_in=true`` keeps everything of a model entry (name, family, size, dtype,
context) but loads, instead of its checkpoint, a two-block model of the same ``model_type``
built from the description below (scaled down: hidden 64, 2 layers) with seeded random
weights and the embedded 8192-token BPE tokenizer of the reference family
(``zoo/checkpoints/gutenberg-llama-200k``). Nothing is read from the hub, so a whole study
runs end to end on a CPU in minutes: a plumbing check, never a result.

A stand-in is never mistaken for the real model: its job key differs (``stand_in`` enters
the model identity only when true), its fingerprint is ``stand-in:<digest>``, its identity
binding has its own label, and its record says so (``model.path`` starts ``stand-in:``,
``env.stand_in`` describes what was built).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from ptqscale.errors import ConfigError

TOKENIZER = Path(__file__).resolve().parents[1] / "zoo" / "checkpoints" / "gutenberg-llama-200k"
VOCAB = 8192   # the size of that tokenizer
SEED = 0       # the stand-in's weights are torch.manual_seed(SEED) initialisation
# The head's bias: log unigram frequencies (add-one) of the first PRIOR_CHARS characters of
# the embedded Gutenberg validation text. A data-independent random model scores above
# ln(vocab) (Jensen), which the full-precision check refuses as broken weights; with this
# prior a stand-in scores like a unigram model, below it.
PRIOR_TEXT = Path(__file__).resolve().parents[1] / "assets" / "data" / "gutenberg-en" / "valid.jsonl.xz"
PRIOR_CHARS = 300_000

# family -> model_type of its members (conf/model/<member>.yaml: ``family``).
FAMILY_ARCHITECTURE = {
    "pythia": "gpt_neox", "pythia-deduped": "gpt_neox", "opt": "opt", "gpt2": "gpt2",
    "bloom": "bloom", "llama-2": "llama", "llama-3": "llama", "qwen2.5": "qwen2",
    "smollm2": "llama", "gutenberg-llama": "llama", "falcon": "falcon", "stablelm": "stablelm",
    "mixtral": "mixtral", "qwen2-moe": "qwen2_moe", "qwen3-moe": "qwen3_moe",
}

# model_type -> the structural fields of a scaled-down member (the real members' choices of
# biases, norms, activations and tying kept; widths and depth shrunk).
ARCHITECTURES: dict[str, dict] = {
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, rotary_pct=0.25, use_parallel_residual=True,
                     tie_word_embeddings=False),
    "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                word_embed_proj_dim=64, do_layer_norm_before=True, enable_bias=True,
                tie_word_embeddings=True),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_inner=256, tie_word_embeddings=True),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, tie_word_embeddings=True),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=192, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=192, tie_word_embeddings=True),
    # falcon-7b: multi-query attention, attention and MLP in parallel, no biases, tied head
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                   parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False,
                   tie_word_embeddings=True),
    # stablelm-2-1_6b: q/k/v biases, LayerNorm, a quarter of each head rotated, untied head
    "stablelm": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=192, use_qkv_bias=True,
                     partial_rotary_factor=0.25, tie_word_embeddings=False),
    # MoE members keep their routing (experts per token; qwen's shared expert) with 8 experts
    "mixtral": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, num_local_experts=8,
                    num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen2_moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=192, moe_intermediate_size=32,
                      num_experts=8, num_experts_per_tok=4, shared_expert_intermediate_size=128,
                      tie_word_embeddings=False),
    "qwen3_moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=192,
                      moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True, tie_word_embeddings=False),
}
_POSITIONS = {"gpt_neox": "max_position_embeddings", "opt": "max_position_embeddings",
              "gpt2": "n_positions", "llama": "max_position_embeddings",
              "qwen2": "max_position_embeddings", "bloom": None,   # bloom: ALiBi, no table
              "falcon": "max_position_embeddings", "stablelm": "max_position_embeddings",
              "mixtral": "max_position_embeddings", "qwen2_moe": "max_position_embeddings",
              "qwen3_moe": "max_position_embeddings"}


def architecture_of(cfg) -> str:
    """The ``model_type`` a stand-in of ``cfg`` has (by ``cfg.family``); a clear error if none."""
    arch = FAMILY_ARCHITECTURE.get(cfg.family)
    if arch is None:
        raise ConfigError(f"model.stand_in=true: no stand-in for family {cfg.family!r} (model "
                          f"{cfg.name!r}); families with one: {sorted(FAMILY_ARCHITECTURE)} "
                          "(models/standins.py)")
    return arch


def description(cfg) -> dict:
    """The whole description of ``cfg``'s stand-in: model_type and its config fields."""
    arch = architecture_of(cfg)
    # no pad_token_id, as the real members (GPT-2's forward then checks inputs for padding)
    fields = {**ARCHITECTURES[arch], "vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0}
    if _POSITIONS[arch]:
        fields[_POSITIONS[arch]] = cfg.max_seqlen or 2048
    return {"model_type": arch, **fields}


def fingerprint(cfg) -> str:
    """``stand-in:<digest>`` of the description, the seed and the tokenizer's file."""
    from ptqscale.runner.identity import file_digest

    text = json.dumps({"description": description(cfg), "seed": SEED, "prior_chars": PRIOR_CHARS,
                       "prior_text": file_digest(PRIOR_TEXT),
                       "tokenizer": file_digest(TOKENIZER / "tokenizer.json")}, sort_keys=True)
    return "stand-in:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def standin_config(cfg):
    """The transformers config of ``cfg``'s stand-in."""
    from transformers import AutoConfig

    desc = description(cfg)
    return AutoConfig.for_model(desc.pop("model_type"), **desc)


def standin_model(cfg, config, dtype):
    """The stand-in itself: ``config`` with weights from ``torch.manual_seed(SEED)`` and a
    head whose bias is the unigram prior (the head's weight kept, tied if it was)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config)
    old = model.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight = old.weight   # the same Parameter: a tied head stays tied
    head.bias = nn.Parameter(unigram_prior())
    model.set_output_embeddings(head)
    return model.to(dtype)


@functools.lru_cache(maxsize=1)
def unigram_prior():
    """Log unigram frequencies (add-one) of the prior text under the stand-in tokenizer."""
    import lzma

    import torch

    texts, size = [], 0
    with lzma.open(PRIOR_TEXT, "rt") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1])
            if size >= PRIOR_CHARS:
                break
    ids = standin_tokenizer()("".join(texts)[:PRIOR_CHARS])["input_ids"]
    counts = torch.bincount(torch.tensor(ids), minlength=VOCAB)[:VOCAB].double() + 1
    return (counts / counts.sum()).log().float()


def standin_tokenizer():
    """The embedded tokenizer every stand-in uses."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def summary(cfg) -> str:
    """One line for the record's ``env.stand_in``."""
    desc = description(cfg)
    return (f"random-init {desc['model_type']} stand-in (seed {SEED}, "
            f"{json.dumps({k: v for k, v in desc.items() if k != 'model_type'}, sort_keys=True)}"
            f"), not {cfg.path}")
