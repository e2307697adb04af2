"""``model.placement=spread``: the block assignment, its validation, and the same numbers.

On CPU the spread is the one-device map (everything on the CPU, accelerate's hooks installed
all the same): the dispatched forward and the methods' walk over blocks "where they live" give
bitwise the numbers of the model in one piece. The GPU test compares spread, streamed and in
one piece on 1 GPU (a map over cuda:0) or 2+ (a real spread).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from tiny_models import TINY_CONFIGS, real_model_paths, save_tiny

from ptqscale.data import CalibConfig, DataConfig, sample_calibration, tokenize_corpus
from ptqscale.errors import ConfigError
from ptqscale.methods import GPTQConfig, QuantContext, RTNConfig, quantize
from ptqscale.methods.awq import AWQConfig
from ptqscale.methods.capture import WalkPlan, walk_blocks
from ptqscale.metrics import EvalConfig, LandscapeConfig, measure_perplexity
from ptqscale.metrics.landscape import measure_landscape
from ptqscale.models import ModelConfig, get_anatomy, load_model, placement_of
from ptqscale.models.spread import (
    SpreadError,
    assign_blocks,
    describe,
    device_map_for,
    spread_devices,
)

PATHS = real_model_paths()
GUTENBERG, TINYSTORIES = PATHS["gutenberg-llama-200k"], PATHS["tinystories"]


# ------------------------------------------------------------------ the assignment


def _loads(blocks, assignment, n, stem, head, head_first=False):
    loads = [0] * n
    loads[0] += stem
    loads[0 if head_first else n - 1] += head
    for b, d in zip(blocks, assignment, strict=True):
        loads[d] += b
    return loads


def _best_max_load(blocks, caps, stem, head):
    """Brute force over every contiguous split (cut points) of the blocks."""
    n, best = len(caps), None
    for cuts in itertools.combinations_with_replacement(range(len(blocks) + 1), n - 1):
        bounds = (0, *cuts, len(blocks))
        assignment = [d for d in range(n) for _ in range(bounds[d], bounds[d + 1])]
        loads = _loads(blocks, assignment, n, stem, head)
        if all(x <= c for x, c in zip(loads, caps, strict=True)):
            best = max(loads) if best is None else min(best, max(loads))
    return best


def test_assignment_is_contiguous_balanced_and_within_capacity():
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        n_blocks = int(torch.randint(1, 9, (1,), generator=gen))
        n_dev = int(torch.randint(1, 4, (1,), generator=gen))
        blocks = torch.randint(1, 20, (n_blocks,), generator=gen).tolist()
        caps = torch.randint(10, 80, (n_dev,), generator=gen).tolist()
        stem, head = (int(x) for x in torch.randint(0, 8, (2,), generator=gen))
        best = _best_max_load(blocks, caps, stem, head)
        if best is None:
            with pytest.raises(SpreadError, match="do not fit"):
                assign_blocks(blocks, caps, stem, head)
            continue
        got = assign_blocks(blocks, caps, stem, head)
        assert got == sorted(got)  # contiguous runs, in block order
        loads = _loads(blocks, got, n_dev, stem, head)
        assert all(x <= c for x, c in zip(loads, caps, strict=True))
        assert max(loads) == best  # the fullest device as empty as any split allows


def test_assignment_examples_and_refusal():
    assert assign_blocks([4] * 4, [100, 100]) == [0, 0, 1, 1]
    assert assign_blocks([4] * 4, [100, 100], stem_bytes=8) == [0, 1, 1, 1]
    assert assign_blocks([4] * 4, [100, 100], head_bytes=8, head_on_first=True) == [0, 1, 1, 1]
    assert assign_blocks([4] * 4, [float("inf")]) == [0] * 4  # a CPU: one device, no bound
    assert assign_blocks([4] * 6, [100, 100, 100]) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(SpreadError, match=r"3 decoder blocks .* do not fit 2 GPU\(s\).*"
                                          r"model.max_gpu_memory"):
        assign_blocks([4, 4, 4], [5, 5])


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_device_map_covers_every_tensor_stem_first_head_last(tmp_path, family):
    """Over two (stand-in) devices: every tensor mapped, blocks in order, the stem on the first
    device, the head on the last (a tied head with the stem); the CPU map forwards bitwise."""
    save_tiny(family, tmp_path)
    model, _ = load_model(ModelConfig(name=family, path=str(tmp_path), device="cpu"))
    a, b = torch.device("cpu"), torch.device("meta")  # names only: nothing moves
    where = device_map_for(model, [a, b], [float("inf")] * 2)
    covered = [n for n, _ in model.named_parameters()
               if any(n == k or n.startswith(k + ".") for k in where)]
    assert covered == [n for n, _ in model.named_parameters()]
    prefix = get_anatomy(model).block_prefix
    blocks = [where[f"{prefix}.{i}"] for i in range(2)]
    assert blocks in (["cpu", "meta"], ["meta", "meta"])  # (a tied stem+head outweighs a block)
    embed = next(k for k in where if model.get_submodule(k) is model.get_input_embeddings())
    assert where[embed] == "cpu"
    head = model.get_output_embeddings()
    head_key = next((k for k in where if model.get_submodule(k) is head), None)
    tied = head.weight is model.get_input_embeddings().weight
    assert head_key is None and tied or where[head_key] == ("cpu" if tied else "meta")
    # dispatched (on the CPU): the family's forward through the hooks, bitwise
    spread, _ = load_model(ModelConfig(name=family, path=str(tmp_path), device="cpu",
                                       placement="spread"))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(spread(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_describe_says_which_blocks_went_where():
    dm = (("model.embed_tokens", "cuda:0"), ("model.layers.0", "cuda:0"),
          ("model.layers.1", "cuda:0"), ("model.layers.2", "cuda:1"),
          ("model.layers.3", "cuda:1"), ("model.norm", "cuda:1"), ("lm_head", "cuda:1"))
    assert describe(dm) == ("cuda:0=model.embed_tokens,model.layers.0-1;"
                            "cuda:1=model.layers.2-3,model.norm,lm_head")


# ------------------------------------------------------------------ validation


def test_spread_is_validated_before_any_load():
    with pytest.raises(ConfigError, match=r"model.gpus=2: .*only with model.placement=spread"):
        ModelConfig(name="m", path="gpt2", gpus=2)
    with pytest.raises(ConfigError, match=r"model.gpus=0"):
        ModelConfig(name="m", path="gpt2", placement="spread", gpus=0)
    with pytest.raises(ConfigError, match=r"model.device='cuda:1' with model.placement=spread"):
        ModelConfig(name="m", path="gpt2", placement="spread", device="cuda:1")
    with pytest.raises(ConfigError, match=r"model.gpus=2 with model.device=cpu"):
        ModelConfig(name="m", path="gpt2", placement="spread", device="cpu", gpus=2)
    assert spread_devices(ModelConfig(name="m", path="gpt2", placement="spread",
                                      device="cpu")) == [torch.device("cpu")]
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    too_many = ModelConfig(name="m", path=GUTENBERG, placement="spread", gpus=visible + 1)
    match = "none is visible" if visible == 0 else f"only {visible} GPU"
    with pytest.raises(ConfigError, match=match):
        load_model(too_many)  # refused by validate_model_config, before reading weights


# ------------------------------------------------------------------ the same numbers on CPU


@pytest.fixture(scope="module")
def gutenberg():
    one, tok = load_model(ModelConfig(name="g", path=GUTENBERG, device="cpu", max_seqlen=512))
    spread, _ = load_model(ModelConfig(name="g", path=GUTENBERG, device="cpu", max_seqlen=512,
                                       placement="spread"))
    calib = DataConfig("tinystories", "validation", path=TINYSTORIES, max_documents=200)
    ids, digest = sample_calibration(CalibConfig(calib, nsamples=4, seqlen=128, seed=0), tok,
                                     None)
    stream = tokenize_corpus(calib, tok, None, preset="gptq")[:3000]
    return one, spread, ids, digest, stream


def test_spread_is_recorded_and_dispatched(gutenberg):
    _, spread, *_ = gutenberg
    placement = placement_of(spread)
    assert placement.spread and not placement.streamed and placement.device.type == "cpu"
    assert describe(placement.device_map).startswith("cpu=model.embed_tokens")
    assert hasattr(spread.model.layers[0], "_hf_hook")  # accelerate's hooks: the real path


@pytest.mark.parametrize("ev", [EvalConfig(seqlen=256, batch_size=3),
                                EvalConfig(preset="rolling", seqlen=256, stride=96, batch_size=4)],
                         ids=["gptq", "rolling"])
def test_spread_perplexity_is_bitwise_the_one_piece_one(gutenberg, ev):
    one, spread, _, _, stream = gutenberg
    a, b = measure_perplexity(one, stream, ev), measure_perplexity(spread, stream, ev)
    assert a.tokens == b.tokens and a.nll_sum == b.nll_sum
    with pytest.raises(ConfigError, match="eval.compile=true needs the model in one piece"):
        measure_perplexity(spread, stream, EvalConfig(seqlen=256, compile=True))


def test_methods_quantize_spread_models_to_the_same_weights(gutenberg):
    one, spread, ids, digest, stream = gutenberg
    for method in (RTNConfig(format="int4_g32"), GPTQConfig(format="int4_g32", device="cpu"),
                   AWQConfig(format="int4_g32", device="cpu")):
        a, b = copy.deepcopy(one), copy.deepcopy(spread)
        quantize(a, method, QuantContext(calibration=ids, calibration_hash=digest))
        quantize(b, method, QuantContext(calibration=ids, calibration_hash=digest))
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), method.name
        assert any(not torch.equal(sa[k], one.state_dict()[k]) for k in sa), method.name
        ev = EvalConfig(seqlen=256, batch_size=4)
        assert measure_perplexity(a, stream, ev).nll_sum == \
            measure_perplexity(b, stream, ev).nll_sum


def test_the_walker_computes_each_block_where_it_lives(gutenberg):
    """A spread model's blocks stay on their device, whatever the method's device says (here
    "meta", where nothing could compute): the walker asks each block for its own."""
    _, spread, ids, *_ = gutenberg
    model = copy.deepcopy(spread)
    anat = get_anatomy(model)
    seen = []

    def quantize_group(names, H, tokens, status):
        seen.append({H.device.type} | {model.get_submodule(n).weight.device.type for n in names})

    plan = WalkPlan(torch.device("meta"), torch.device("cpu"), 2, True, False)
    walk_blocks(model, anat, dict(anat.targets), ids, plan, quantize_group)
    assert seen and all(s == {"cpu"} for s in seen)


def test_landscape_of_a_spread_model_is_the_one_piece_one(gutenberg):
    one, spread, _, _, stream = gutenberg
    windows = stream[:768].view(3, 256)
    cfg = LandscapeConfig(enabled=True, levels_db=[30.0, 20.0], seeds=1, max_tokens=768,
                          hutchinson_probes=2, power_iters=2, power_tol=0.0, hvp_windows=3)
    a = measure_landscape(one, dict(get_anatomy(one).targets), windows, cfg)
    b = measure_landscape(spread, dict(get_anatomy(spread).targets), windows, cfg)

    def numbers(d):
        return {k: v for k, v in d.items() if not k.startswith("cost_")}

    assert a["hessian_trace"] > 0 and numbers(a) == numbers(b)


def test_blockft_refuses_a_spread_model(gutenberg):
    from ptqscale.methods.blockft import BlockFTConfig

    _, spread, ids, digest, _ = gutenberg
    with pytest.raises(ConfigError, match="does not run on a spread model"):
        quantize(copy.deepcopy(spread), BlockFTConfig(format="int4_g32", device="cpu"),
                 QuantContext(calibration=ids, calibration_hash=digest))


# ------------------------------------------------------------------ GPU: a real spread


def _random_llama_folder(folder) -> str:
    """A random untied Llama of 6 equal blocks (small vocabulary: blocks dominate), saved."""
    import transformers as T
    from tiny_models import tiny_tokenizer

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                           num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=1024, tie_word_embeddings=False)
    T.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["gutenberg-llama-200k", "random-llama-6"])
def test_spread_agrees_with_streamed_and_one_piece_on_cuda(tmp_path, which):
    """1 GPU: the map over cuda:0; 2+: whole blocks on the visible GPUs (the random untied
    model puts blocks on 2+ GPUs; the tied gutenberg model its blocks on the second, the
    embedding and head on the first). NLL and GPTQ weights agree with the streamed
    single-GPU path and the model in one piece (to rounding)."""
    path = GUTENBERG if which == "gutenberg-llama-200k" else _random_llama_folder(tmp_path)
    # bf16: the dtype big models run in (and the fused kernels' fast path)
    base = dict(name="g", path=path, device="auto", max_seqlen=512, dtype="bfloat16")
    one, _ = load_model(ModelConfig(**base))
    streamed, _ = load_model(ModelConfig(**base, placement="streamed"))
    spread, _ = load_model(ModelConfig(**base, placement="spread"))
    device_map = dict(placement_of(spread).device_map)
    prefix = get_anatomy(spread).block_prefix
    blocks_on = {d for k, d in device_map.items() if k.startswith(prefix + ".")}
    gpus = torch.cuda.device_count()
    assert len(set(device_map.values())) >= min(gpus, 2)
    if which == "random-llama-6":
        assert len(blocks_on) >= min(gpus, 2)
    for name, d in device_map.items():  # every weight where the map says
        assert all(str(p.device) == d for p in spread.get_submodule(name).parameters())
    stream = torch.randint(0, one.config.vocab_size, (4096,),
                           generator=torch.Generator().manual_seed(0))
    ev = EvalConfig(seqlen=512, batch_size=2)
    nll = [measure_perplexity(m, stream, ev).nll for m in (one, streamed, spread)]
    assert abs(nll[2] - nll[1]) < 1e-4 * nll[1] and abs(nll[2] - nll[0]) < 1e-4 * nll[0]
    calib = stream[:1024].view(4, 256)
    # RTN: the fused Triton kernel on each weight's own GPU; GPTQ: each block on its own GPU
    for method in (RTNConfig(format="int4_g32"), GPTQConfig(format="int4_g32", device="cuda")):
        states = []
        for m in (one, streamed, spread):
            q = copy.deepcopy(m)  # (a dispatched model's copy keeps its hooks and devices)
            quantize(q, method, QuantContext(calibration=calib, calibration_hash="x"))
            states.append({k: v.cpu() for k, v in q.state_dict().items()})
        for name, d in device_map.items():  # nothing moved by the method
            assert all(str(p.device) == d for p in q.get_submodule(name).parameters())
        for k in states[0]:  # the same grid: at most a rare one-step flip from rounding
            for s in states[1:]:
                assert (states[0][k] != s[k]).float().mean() < 1e-3, (method.name, k)
        assert measure_perplexity(q, stream, ev).nll != nll[2]  # quantized: a new number
