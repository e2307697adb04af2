"""``eval.head=chunked`` and ``eval.attention``: the NLL of the chunked head and loss equals
that of the full logits on stories260K and the embedded family members, the model gets its
head back, the attention kernel that ran is recorded, and what cannot apply fails early."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import transformers as T

from ptqscale.assets import ZOO_CHECKPOINTS
from ptqscale.errors import ConfigError
from ptqscale.metrics import EvalConfig, measure_perplexity
from ptqscale.metrics import chunked_head as CH
from ptqscale.runner.keys import eval_identity

MEMBERS = ("gutenberg-llama-200k", "gutenberg-llama-500k", "gutenberg-llama-1m")
CXX = bool(shutil.which("g++") or shutil.which("c++"))
CONFIGS = (EvalConfig(seqlen=128, batch_size=3, max_tokens=1024),
           EvalConfig("rolling", seqlen=128, stride=48, batch_size=4, max_tokens=600))


def _load(shared_data, name: str):
    from ptqscale.models import ModelConfig, load_model

    text = shared_data / "tinystories-valid-sample" / "tinystories_val.txt"
    if name == "stories260k":
        path = shared_data / "models" / "stories260K" / "stories260K.gguf"
    else:
        path = ZOO_CHECKPOINTS / name
    if not path.exists() or not text.is_file():
        pytest.skip(f"{name} or the TinyStories sample is missing")
    model, tok = load_model(ModelConfig(name=name, path=str(path), max_seqlen=512))
    return model.eval(), tok(text.read_text()[:6_000], return_tensors="pt").input_ids[0]


@pytest.mark.parametrize("name, dtype", [("stories260k", torch.float32),
                                         *[(m, torch.float32) for m in MEMBERS],
                                         (MEMBERS[-1], torch.bfloat16)])
def test_chunked_head_equals_the_full_logits(shared_data, name, dtype, monkeypatch):
    model, stream = _load(shared_data, name)
    model.to(dtype)
    # fp32 on CPU: observed bitwise equal; bf16: the head's logits are rounded to bf16 per
    # chunk as in the full logits, the fp32 loss then reorders sums only
    rel = 1e-6 if dtype == torch.float32 else 1e-4
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    # 37 rows a chunk: chunks that straddle windows and batches, and a short last one
    monkeypatch.setattr(CH, "HEAD_CHUNK_ELEMENTS", 37 * vocab)
    for cfg in CONFIGS:
        full = measure_perplexity(model, stream, cfg)
        chunked = measure_perplexity(model, stream, dataclasses.replace(cfg, head="chunked"))
        assert chunked.to_dict().keys() == full.to_dict().keys()
        assert (chunked.tokens, chunked.windows) == (full.tokens, full.windows)
        assert chunked.nll == pytest.approx(full.nll, rel=rel, abs=0), (cfg.preset, name)
    assert model.get_output_embeddings() is head   # the head is back after the pass
    assert model.ptqscale_attention.startswith("sdpa:"), model.ptqscale_attention


def test_pinned_attention_is_recorded_and_unavailable_one_fails_early(shared_data):
    model, stream = _load(shared_data, "gutenberg-llama-200k")
    cfg = CONFIGS[0]
    auto = measure_perplexity(model, stream, cfg)
    math_ = measure_perplexity(model, stream, dataclasses.replace(cfg, attention="math"))
    assert model.ptqscale_attention == "sdpa:MATH"
    assert math_.nll == pytest.approx(auto.nll, rel=1e-5)
    if not torch.cuda.is_available():  # cuDNN attention exists on CUDA only
        with pytest.raises(ConfigError, match="eval.attention"):
            measure_perplexity(model, stream, dataclasses.replace(cfg, attention="cudnn"))


def test_a_model_that_changes_its_logits_after_the_head_is_refused():
    torch.manual_seed(0)
    cfg = T.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
                         max_position_embeddings=128, final_logit_softcapping=5.0,
                         attn_implementation="eager")
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    stream = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(1))
    cfg = EvalConfig(seqlen=64, batch_size=2, head="chunked")
    with pytest.raises(ConfigError, match="eval.head=chunked.*soft-capping"):
        measure_perplexity(model, stream, cfg)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)


@pytest.mark.parametrize("bad, match", [(dict(head="fused"), "eval.head"),
                                        (dict(attention="flash3"), "eval.attention"),
                                        (dict(cuda_graphs=True), "eval.compile=true"),
                                        (dict(cuda_graphs="yes", compile=True), "true or false")])
def test_bad_settings_fail_with_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        EvalConfig(**bad)


def test_keys_move_only_away_from_the_earlier_behaviour():
    base = eval_identity(EvalConfig())
    assert "head" not in base and "attention" not in base and "cuda_graphs" not in base
    assert eval_identity(EvalConfig(compile=True, cuda_graphs=True)) == \
        eval_identity(EvalConfig(compile=True))   # CUDA graphs: speed only
    assert eval_identity(EvalConfig(head="chunked"))["head"] == "chunked"
    assert eval_identity(EvalConfig(attention="flash"))["attention"] == "flash"


@pytest.mark.slow
@pytest.mark.skipif(not CXX, reason="Inductor's CPU backend needs a C++ compiler")
def test_compiled_chunked_pass_equals_eager_logits():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                        max_position_embeddings=128)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    stream = torch.randint(0, 96, (700,), generator=torch.Generator().manual_seed(1))
    eval_cfg = EvalConfig(seqlen=64, batch_size=4, max_tokens=512)
    eager = measure_perplexity(model, stream, eval_cfg)
    fused = measure_perplexity(model, stream, dataclasses.replace(eval_cfg, compile=True,
                                                                  head="chunked"))
    assert fused.nll == pytest.approx(eager.nll, rel=1e-5)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)


def _largest_vocab_tensor(fn, vocab: int) -> int:
    """Elements of the largest tensor with ``vocab`` in its last dimension made by ``fn()``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.ndim and t.shape[-1] == vocab:
                    Largest.most = max(Largest.most, t.numel())
            return out

    with Largest():
        fn()
    return Largest.most


def test_chunked_head_never_holds_a_batch_of_logits(shared_data, monkeypatch):
    model, stream = _load(shared_data, "gutenberg-llama-200k")
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(CH, "HEAD_CHUNK_ELEMENTS", 37 * vocab)
    cfg = EvalConfig(seqlen=128, batch_size=4, max_tokens=1024)
    full = _largest_vocab_tensor(lambda: measure_perplexity(model, stream, cfg), vocab)
    chunked = _largest_vocab_tensor(
        lambda: measure_perplexity(model, stream, dataclasses.replace(cfg, head="chunked")), vocab)
    assert full >= 4 * 128 * vocab      # the logits of a batch: [4, 128, vocab]
    assert chunked <= 37 * vocab        # one chunk of rows at a time, nothing larger


@pytest.mark.slow   # two jobs end to end (~50 s on 2 cores)
def test_a_job_records_the_same_fields_and_its_attention_kernel(tmp_path):
    from hydra import compose, initialize_config_dir

    from ptqscale.runner.app import conf_dir
    from ptqscale.runner.config import register_configs
    from ptqscale.runner.job import run_job

    register_configs()
    common = ["model=gutenberg-llama-200k", "model.device=cpu", "data=gutenberg", "method=rtn",
              "format=int4", "eval.max_tokens=2048", "eval.seqlen=256", "progress=false",
              "wandb.mode=disabled", "metrics=[nll,weight_sqnr,model_bytes,fidelity]"]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        recs = [run_job(compose("config", overrides=[*common, f"eval.head={head}",
                                                     f"paths.results={tmp_path / head}"]))
                for head in ("logits", "chunked")]
    logits, chunked = (r["metrics"] for r in recs)
    assert logits.keys() == chunked.keys()
    for field in ("nll", "nll_fp", "dnll", "kl_mean"):
        assert chunked[field] == pytest.approx(logits[field], rel=1e-6, abs=1e-9), field
    assert recs[0]["job_key"] != recs[1]["job_key"]
    assert recs[1]["config"]["eval"]["head"] == "chunked"
    assert all(r["env"]["attention"].startswith("sdpa:") for r in recs)
