"""Architecture presets of the family factory: plain transformers models built from configs.

A preset turns a member's shape (hidden, layers, heads, ffn) and the family's recipe into a
``transformers`` config with every structural field set, so the rest of ptqscale (anatomy,
methods, streaming) sees an ordinary Llama, GPT-2, OPT or GPT-NeoX model:

- ``llama``: pre-norm RMSNorm, SwiGLU, RoPE, no biases (``LlamaForCausalLM``)
- ``gpt2``: pre-norm LayerNorm, GELU (tanh form), learned positions, biases, Conv1D
  weights stored transposed (``GPT2LMHeadModel``)
- ``opt``: pre-norm LayerNorm, ReLU, learned positions (offset 2), biases (``OPTForCausalLM``)
- ``neox``: parallel residual (attention and MLP read the same input), LayerNorm, GELU,
  partial RoPE on 25% of each head, biases (``GPTNeoXForCausalLM``, Pythia's form)

How to add a preset: write a ``<name>_config(recipe, shape, eos_id)`` builder, list it in
``PRESETS`` with the suffixes of its residual-branch output projections and the name parts
of its embedding/head parameters; tests/zoo/test_factory.py then builds and trains it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """One member's shape: width, depth, attention heads and MLP width."""

    hidden: int
    layers: int
    heads: int
    ffn: int


def _common(recipe, shape: Shape, eos_id: int) -> dict:
    return dict(vocab_size=recipe.vocab_size, bos_token_id=eos_id, eos_token_id=eos_id,
                pad_token_id=eos_id, tie_word_embeddings=recipe.tie_embeddings, use_cache=True)


def llama_config(recipe, shape: Shape, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        **_common(recipe, shape, eos_id), hidden_size=shape.hidden,
        intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        head_dim=shape.hidden // shape.heads, hidden_act="silu",
        max_position_embeddings=recipe.seqlen, initializer_range=recipe.init_std,
        rms_norm_eps=recipe.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta},
        attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        architectures=["LlamaForCausalLM"])


def gpt2_config(recipe, shape: Shape, eos_id: int):
    from transformers import GPT2Config

    cfg = GPT2Config(
        **_common(recipe, shape, eos_id), n_positions=recipe.seqlen, n_embd=shape.hidden,
        n_layer=shape.layers, n_head=shape.heads, n_inner=shape.ffn,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=recipe.norm_eps, initializer_range=recipe.init_std,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False, architectures=["GPT2LMHeadModel"])
    cfg.pad_token_id = None  # GPT-2's forward probes for padding when a pad id is set
    return cfg


def opt_config(recipe, shape: Shape, eos_id: int):
    from transformers import OPTConfig

    return OPTConfig(
        **_common(recipe, shape, eos_id), hidden_size=shape.hidden,
        num_hidden_layers=shape.layers, ffn_dim=shape.ffn, num_attention_heads=shape.heads,
        max_position_embeddings=recipe.seqlen, do_layer_norm_before=True,
        word_embed_proj_dim=shape.hidden, dropout=0.0, attention_dropout=0.0,
        activation_function="relu", layerdrop=0.0, init_std=recipe.init_std,
        enable_bias=True, layer_norm_elementwise_affine=True, architectures=["OPTForCausalLM"])


def neox_config(recipe, shape: Shape, eos_id: int):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        **_common(recipe, shape, eos_id), hidden_size=shape.hidden,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        intermediate_size=shape.ffn, hidden_act="gelu", attention_dropout=0.0,
        hidden_dropout=0.0, classifier_dropout=0.0, max_position_embeddings=recipe.seqlen,
        initializer_range=recipe.init_std, layer_norm_eps=recipe.norm_eps,
        use_parallel_residual=True, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta,
                         "partial_rotary_factor": recipe.rotary_fraction},
        architectures=["GPTNeoXForCausalLM"])


@dataclass(frozen=True)
class Preset:
    """How to build one architecture and which of its parameters are what."""

    build_config: object
    gated_mlp: bool  # SwiGLU (3 MLP matrices) or a plain 2-matrix MLP
    residual_outputs: tuple[str, ...]  # weights that write into the residual stream
    embedding_parts: tuple[str, ...]  # name parts of embedding, position and head tables


PRESETS: dict[str, Preset] = {
    "llama": Preset(llama_config, True, ("o_proj.weight", "down_proj.weight"),
                    ("embed_tokens", "lm_head")),
    "gpt2": Preset(gpt2_config, False, ("attn.c_proj.weight", "mlp.c_proj.weight"),
                   ("wte", "wpe", "lm_head")),
    "opt": Preset(opt_config, False, ("out_proj.weight", "fc2.weight"),
                  ("embed_tokens", "embed_positions", "lm_head")),
    "neox": Preset(neox_config, False, ("attention.dense.weight", "dense_4h_to_h.weight"),
                   ("embed_in", "embed_out", "lm_head")),
}


def build_model(recipe, shape: Shape, eos_id: int = 0):
    """A freshly initialized member (float32, CPU) of ``recipe.preset`` (see ``init_weights``).

    Example::

        >>> from ptqscale.zoo.family import load_family
        >>> fam = load_family("zoo-opt")
        >>> model = build_model(fam, fam.shape("100k"))
        >>> type(model).__name__
        'OPTForCausalLM'
    """
    from transformers import AutoModelForCausalLM

    config = PRESETS[recipe.preset].build_config(recipe, shape, eos_id)
    config._attn_implementation = "eager"  # the same kernels on CPU and GPU, no SDPA choice
    model = AutoModelForCausalLM.from_config(config).float()
    init_weights(model, recipe)
    return model


@torch.no_grad()
def init_weights(model: torch.nn.Module, recipe) -> None:
    """N(0, init_std) for matrices and tables, ones for norm gains, zeros for biases; the
    residual-branch output projections get std / sqrt(2 * layers) (GPT-2's rule) so the
    residual stream's variance at init does not grow with depth.

    Drawn on the CPU from one generator seeded with ``recipe.seed`` in parameter order, so
    the init is the same on every device and never rides on a library's own init.
    """
    preset, layers = PRESETS[recipe.preset], model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(recipe.seed)
    for name, p in model.named_parameters():  # a tied head is listed once
        if p.ndim == 1:
            p.fill_(0.0 if name.endswith("bias") else 1.0)
            continue
        std = recipe.init_std
        if recipe.residual_init_scaling and name.endswith(preset.residual_outputs):
            std /= math.sqrt(2 * layers)
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


def count_parameters(model: torch.nn.Module, preset: str) -> dict[str, int]:
    """Total, embedding (token and position tables, and an untied head) and non-embedding."""
    parts = PRESETS[preset].embedding_parts
    unique = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    emb = sum(p.numel() for n, p in unique if any(part in n for part in parts))
    total = sum(p.numel() for _, p in unique)
    return {"total": total, "embedding": emb, "non_embedding": total - emb}
