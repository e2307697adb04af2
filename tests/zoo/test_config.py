"""The family's size table and recipe: spans, validation, schedule, init."""

from __future__ import annotations

import math

import pytest
import torch

from ptqscale.errors import ConfigError
from ptqscale.zoo.config import SIZES, ZooConfig, lr_at
from ptqscale.zoo.model import build_model, count_parameters, llama_config
from ptqscale.zoo.train import parse_overrides


def _nominal(name: str) -> float:
    scale = {"k": 1e3, "m": 1e6}[name[-1]]
    return float(name[:-1]) * scale


@pytest.fixture(scope="module")
def counts() -> dict[str, dict[str, int]]:
    """Counted on the real transformers model, built on the meta device (no memory, no init)."""
    from transformers import LlamaForCausalLM

    out = {}
    for s in SIZES:
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(ZooConfig(size=s)))
        out[s] = count_parameters(model)
    return out


def test_size_table_spans_30x_in_non_embedding_params(counts):
    non_emb = [counts[s]["non_embedding"] for s in SIZES]
    assert len(SIZES) >= 6
    assert non_emb == sorted(non_emb) and len(set(non_emb)) == len(non_emb)
    assert non_emb[-1] / non_emb[0] >= 30


def test_size_names_state_the_non_embedding_count(counts):
    for name, c in counts.items():
        ratio = c["non_embedding"] / _nominal(name)
        assert 0.9 < ratio < 1.15, (name, c)


def test_counts_match_the_closed_form(counts):
    for name, c in counts.items():
        cfg = ZooConfig(size=name)
        d, f, n = cfg.hidden, cfg.ffn, cfg.layers
        assert c["non_embedding"] == n * (4 * d * d + 3 * d * f + 2 * d) + d
        assert c["embedding"] == cfg.vocab_size * d  # tied: the head adds nothing


def test_model_shape_follows_the_config():
    cfg = ZooConfig(size="2m")
    model = build_model(cfg)
    assert model.config.hidden_size == 160 and model.config.num_hidden_layers == 6
    assert model.config.num_attention_heads == 5 and model.config.head_dim == 32
    assert model.config.intermediate_size == 448  # 8/3 * 160 = 426, rounded up to 32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("changes, needle", [
    ({"size": "7m"}, "size='7m' is not one of"),
    ({"batch_tokens": 1000}, "multiple of seqlen"),
    ({"train_tokens": 32768 * 3 + 512}, "whole steps"),
    ({"vocab_size": 70000}, "vocab_size"),
    ({"warmup_frac": 1.0}, "warmup_frac"),
    ({"train_dtype": "int8"}, "train_dtype"),
    ({"head_dim": 48}, "head_dim"),
])
def test_bad_values_are_rejected_with_the_key(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        ZooConfig(**changes)


def test_schedule_warmup_then_cosine_to_the_floor():
    cfg = ZooConfig(size="1m")
    lrs = [lr_at(cfg, s) for s in range(cfg.steps)]
    w = cfg.warmup_steps
    assert lrs[:w] == sorted(lrs[:w]) and lrs[w - 1] == pytest.approx(cfg.peak_lr)
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1:]))
    assert lrs[-1] == pytest.approx(cfg.min_lr_ratio * cfg.peak_lr)
    mid = w + (cfg.steps - 1 - w) // 2
    assert lrs[mid] == pytest.approx(cfg.peak_lr * 0.55, rel=1e-2)  # cosine half-way


def test_peak_lr_scales_inversely_with_width():
    lrs = {s: ZooConfig(size=s).peak_lr * ZooConfig(size=s).hidden for s in SIZES}
    assert len({round(v, 6) for v in lrs.values()}) == 1


def test_init_is_seeded_and_scales_residual_outputs():
    a, b = build_model(ZooConfig(size="200k")), build_model(ZooConfig(size="200k"))
    c = build_model(ZooConfig(size="200k", seed=7))
    wa, wc = a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight
    assert torch.equal(wa, b.model.layers[0].mlp.up_proj.weight) and not torch.equal(wa, wc)
    assert wa.std().item() == pytest.approx(0.02, rel=0.05)
    down = torch.cat([m.mlp.down_proj.weight.flatten() for m in a.model.layers])
    assert down.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert torch.equal(a.model.norm.weight, torch.ones(64))


def test_overrides_are_typed_and_unknown_keys_fatal():
    cfg = parse_overrides(["weight_decay=0", "betas=0.9,0.99", "tie_embeddings=false"],
                          ZooConfig(size="1m"))
    assert cfg.weight_decay == 0.0 and cfg.betas == (0.9, 0.99) and cfg.tie_embeddings is False
    with pytest.raises(ConfigError, match="KEY one of"):
        parse_overrides(["weigth_decay=0"], ZooConfig())
