"""Build and initialize one member: a plain transformers ``LlamaForCausalLM``.

Llama architecture (pre-norm RMSNorm, RoPE, SwiGLU, no biases), multi-head attention with
head dim 32, tied input/output embeddings. Why tied: at these widths the 8192 x hidden
embedding is 0.15-2.5x the non-embedding parameters; untying would double that share of
every checkpoint for little gain (small models such as MobileLLM, Llama 3.2 1B and Gemma
tie for the same reason). PTQ code must therefore not quantize ``lm_head`` in place without
untying it first, since it is the embedding too (ptqscale keeps head and embedding in full
precision by default).
"""

from __future__ import annotations

import math

import torch

from ptqscale.zoo.config import ZooConfig


def llama_config(cfg: ZooConfig, eos_id: int = 0):
    """The ``transformers.LlamaConfig`` of a member (everything set, nothing left to defaults)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.seqlen, initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        use_cache=True, architectures=["LlamaForCausalLM"],
    )


def build_model(cfg: ZooConfig, eos_id: int = 0):
    """A freshly initialized member in float32 on the CPU (see ``init_weights``).

    Example::

        >>> model = build_model(ZooConfig(size="200k"))
        >>> count_parameters(model)["non_embedding"]
        213568
    """
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(cfg, eos_id)).float()
    init_weights(model, cfg)
    return model


@torch.no_grad()
def init_weights(model: torch.nn.Module, cfg: ZooConfig) -> None:
    """N(0, init_std) for matrices, ones for norm gains; output projections of each residual
    branch (o_proj, down_proj) get std / sqrt(2 * layers), as GPT-2 does, so the residual
    stream's variance at init does not grow with depth.

    Drawn on the CPU from one generator seeded with ``cfg.seed`` in parameter order, so the
    init is the same on every device and never depends on a library's own init (which has
    changed between releases before: see Pythia's erratum).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    for name, p in model.named_parameters():  # a tied head is listed once, as the embedding
        if p.ndim == 1:
            p.fill_(1.0)
            continue
        std = cfg.init_std
        if cfg.residual_init_scaling and name.endswith(("o_proj.weight", "down_proj.weight")):
            std /= math.sqrt(2 * cfg.layers)
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total, embedding (input embedding, plus the head when untied) and non-embedding counts."""
    unique = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    emb = sum(p.numel() for n, p in unique if "embed_tokens" in n or n.startswith("lm_head"))
    total = sum(p.numel() for _, p in unique)
    return {"total": total, "embedding": emb, "non_embedding": total - emb}
