"""``eval.compile``: compiled blocks give the eager NLL, and the model gets its modules back."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import transformers as T
import yaml
from torch import nn

from ptqscale.errors import ConfigError
from ptqscale.metrics import EvalConfig, measure_perplexity
from ptqscale.metrics.perplexity import EvalCompileError

VOCAB = 96
HAS_CXX = bool(shutil.which("g++") or shutil.which("c++"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                        max_position_embeddings=128)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, VOCAB, (1000,), generator=torch.Generator().manual_seed(1))


# Both presets cut [4, 64] batches only (8 and 40 windows), so the whole file compiles one
# block graph and one loss graph: two compilations.
CONFIGS = {"gptq": EvalConfig(seqlen=64, batch_size=4, max_tokens=512),
           "rolling": EvalConfig("rolling", seqlen=64, stride=24, batch_size=4)}


@pytest.fixture(scope="module")
def compiled_runs(model, stream):
    """Eager and compiled results of each preset, the graphs compiled, the blocks before."""
    from torch._dynamo.utils import counters

    if not HAS_CXX:
        pytest.skip("Inductor's CPU backend needs a C++ compiler (g++ or c++ on PATH)")
    torch._dynamo.reset()  # count only this file's graphs
    counters.clear()
    before = list(model.model.layers)
    runs = {}
    for name, cfg in CONFIGS.items():
        eager = measure_perplexity(model, stream, cfg)
        runs[name] = (eager, measure_perplexity(model, stream, _compiled(cfg)))
    return runs, counters["stats"]["unique_graphs"], before


def _compiled(cfg: EvalConfig) -> EvalConfig:
    return dataclasses.replace(cfg, compile=True)


@pytest.mark.parametrize("preset", CONFIGS)
def test_compiled_nll_equals_eager(compiled_runs, preset):
    eager, compiled = compiled_runs[0][preset]
    assert (compiled.tokens, compiled.windows) == (eager.tokens, eager.windows)
    # fp32 weights: the fused kernels only reorder fp32 sums (observed ~1e-7 relative)
    assert compiled.nll_sum == pytest.approx(eager.nll_sum, rel=1e-5)
    assert compiled.nll == pytest.approx(eager.nll, rel=1e-5)


def test_all_blocks_share_one_graph_and_are_restored(compiled_runs, model):
    _, graphs, before = compiled_runs
    # one graph for the 3 blocks (no recompilation per layer) + one for the loss
    assert graphs == 2
    assert all(a is b for a, b in zip(model.model.layers, before, strict=True))
    assert not any("_orig_mod" in name for name, _ in model.named_modules())


def test_cuda_graphs_compile_the_decoder_whole_and_give_the_eager_nll(model, stream):
    """Graph trees would let compiled blocks overwrite their own inputs (perplexity.py
    ``_compiled_parts``): with ``cuda_graphs`` the decoder is one graph, called once per batch.
    On CPU ``reduce-overhead`` compiles without the graphs: the same swap, the same NLL."""
    if not HAS_CXX:
        pytest.skip("Inductor's CPU backend needs a C++ compiler (g++ or c++ on PATH)")
    from ptqscale.metrics.perplexity import _compiled_parts

    parts = _compiled_parts(model, "model.layers", cuda_graphs=True)
    assert [(owner, key) for owner, key, _ in parts] == [(model, "model")]
    assert len(_compiled_parts(model, "model.layers", cuda_graphs=False)) == 3
    decoder, seen = model.model, []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(type(m.model).__name__))
    cfg = dataclasses.replace(CONFIGS["gptq"], compile=True, cuda_graphs=True)
    try:
        graphs = measure_perplexity(model, stream, cfg)
    finally:
        hook.remove()
    # the few-token probe of the attention kernel first, then every batch through the graph
    assert seen[0] == "LlamaModel" and set(seen[1:]) == {"OptimizedModule"}
    assert len(seen) == 3 and model.model is decoder   # 8 windows in batches of 4
    eager = measure_perplexity(model, stream, CONFIGS["gptq"])
    assert graphs.nll_sum == pytest.approx(eager.nll_sum, rel=1e-5)
    with pytest.raises(ConfigError, match="cuda_graphs=true replays the decoder"):
        _compiled_parts(model, "layers", cuda_graphs=True)


class _Explodes(nn.Module):
    """Stands in for a compiled block: raises ``error`` when called."""

    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    def forward(self, *args, **kwargs):
        raise self.error


def _compile_failure() -> Exception:
    return torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no cc"), None)


@pytest.mark.parametrize("error, raised, match", [
    (RuntimeError("boom in a block"), RuntimeError, "boom in a block"),
    (_compile_failure(), EvalCompileError, r"eval\.compile=true.*set eval\.compile=false"),
])
def test_blocks_restored_after_an_error_inside_the_pass(model, stream, monkeypatch, error,
                                                        raised, match):
    before = list(model.model.layers)
    monkeypatch.setattr(torch, "compile", lambda obj, **kw: _Explodes(error))
    with pytest.raises(raised, match=match):
        measure_perplexity(model, stream, _compiled(CONFIGS["gptq"]))
    assert all(a is b for a, b in zip(model.model.layers, before, strict=True))


def test_torch_compile_refusing_to_wrap_names_the_option(model, stream, monkeypatch):
    before = list(model.model.layers)

    def refuse(obj, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.raises(EvalCompileError, match="eval.compile=true.*not supported on this Python"):
        measure_perplexity(model, stream, _compiled(CONFIGS["gptq"]))
    assert all(a is b for a, b in zip(model.model.layers, before, strict=True))


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_compile_must_be_a_bool(value):
    with pytest.raises(ConfigError, match=r"eval\.compile=.* must be true or false"):
        EvalConfig(compile=value)
    assert EvalConfig().compile is False


def test_conf_eval_files_state_compile(repo_root):
    for path in sorted((repo_root / "conf" / "eval").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["compile"] is False, path.name


def test_compile_is_recorded_and_keyed():
    from hydra import compose, initialize_config_dir

    from ptqscale.runner.app import conf_dir
    from ptqscale.runner.config import register_configs
    from ptqscale.runner.job import _base_record, validate_job

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfgs = [compose("config", overrides=[f"eval.compile={v}"]) for v in ("false", "true")]
    specs = [validate_job(c) for c in cfgs]
    assert [_base_record(s, c)["eval"]["compile"] for s, c in zip(specs, cfgs)] == [False, True]
    assert specs[0].key != specs[1].key  # compiled kernels round differently: another result
