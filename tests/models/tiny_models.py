"""Tiny randomly initialised checkpoints of every supported family, saved like real ones.

(A module of its own, not conftest, so that tests can import it by a unique name.)
"""

from __future__ import annotations

import torch
import transformers as T
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

VOCAB = 128
_ATTN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, vocab_size=VOCAB)
_GQA = dict(_ATTN, num_key_value_heads=2)

# One tiny config per supported model_type (hidden 32, 2 layers, vocab 128).
TINY_CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_GQA),
    "mistral": lambda: T.MistralConfig(**_GQA),
    "qwen2": lambda: T.Qwen2Config(**_GQA),
    "qwen3": lambda: T.Qwen3Config(**_GQA, head_dim=8),
    "opt": lambda: T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=256,
                               word_embed_proj_dim=32, vocab_size=VOCAB),
    "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                 vocab_size=VOCAB),
    "gpt_neox": lambda: T.GPTNeoXConfig(**_ATTN),
    "bloom": lambda: T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB),
    "phi": lambda: T.PhiConfig(**_ATTN),
    "phi3": lambda: T.Phi3Config(**_ATTN, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma": lambda: T.GemmaConfig(**_GQA, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**_GQA, head_dim=8),
    # falcon-7b's layout (multi-query attention, parallel attention + MLP, tied head)
    "falcon": lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=256, vocab_size=VOCAB),
    # stablelm-2-1_6b's choices: q/k/v biases, LayerNorm, a quarter of each head rotated
    "stablelm": lambda: T.StableLmConfig(**_GQA, use_qkv_bias=True, partial_rotary_factor=0.25),
    # MoE: 4 experts, 2 per token (their fused weights are split per expert at load)
    "mixtral": lambda: T.MixtralConfig(**_GQA, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_GQA, moe_intermediate_size=32, num_experts=4,
                                          num_experts_per_tok=2,
                                          shared_expert_intermediate_size=64),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_GQA, head_dim=8, moe_intermediate_size=32,
                                          num_experts=4, num_experts_per_tok=2),
}


def tiny_tokenizer() -> T.PreTrainedTokenizerFast:
    """A character-level tokenizer with the tiny models' 128 ids (printable ASCII + <unk>)."""
    vocab = {chr(32 + i): i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def save_tiny(family: str, folder, seed: int = 0):
    """Build the tiny model of ``family``, save it (safetensors + tokenizer); return the model."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS[family]()).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return model


# The embedded real models and corpus the placement tests compare on.
def real_model_paths() -> dict[str, str]:
    from ptqscale.assets import DATA, ZOO_CHECKPOINTS

    return {"stories260k": str(DATA / "models" / "stories260K" / "stories260K.gguf"),
            "gutenberg-llama-200k": str(ZOO_CHECKPOINTS / "gutenberg-llama-200k"),
            "tinystories": str(DATA / "tinystories-valid-sample")}


def one_and_streamed(path: str, **kw):
    """A model loaded in one piece and streamed (CPU), and its tokenizer."""
    from ptqscale.models import ModelConfig, load_model

    one, tok = load_model(ModelConfig(name="m", path=path, device="cpu", max_seqlen=512, **kw))
    streamed, _ = load_model(ModelConfig(name="m", path=path, device="cpu", max_seqlen=512,
                                         placement="streamed", **kw))
    return one, streamed, tok


def tiny_one_and_streamed(family: str, folder):
    """A tiny random model of ``family`` saved to ``folder`` and loaded in one piece, and a
    copy of it marked streamed (CPU: the block-by-block code path on the same arithmetic)."""
    import copy

    import torch

    from ptqscale.models import ModelConfig, Placement, load_model
    from ptqscale.models.streaming import set_placement

    save_tiny(family, folder)
    one, _ = load_model(ModelConfig(name=family, path=str(folder), device="cpu"))
    streamed = copy.deepcopy(one)
    set_placement(streamed, Placement(True, torch.device("cpu")))
    return one, streamed

