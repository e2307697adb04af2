"""Weights memory-mapped from safetensors (models/mapped.py): a streamed model's weights are views
of the checkpoint file, give the numbers of a copy in memory, and a reused model is put back
without reading or copying what the job left unchanged (models/reuse.py)."""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch
import transformers as T
from tiny_models import tiny_tokenizer

from ptqscale.errors import ConfigError
from ptqscale.methods import GPTQConfig, QuantContext, RTNConfig, quantize
from ptqscale.metrics import EvalConfig, measure_perplexity
from ptqscale.models import ModelConfig, load_model
from ptqscale.models import mapped as mm
from ptqscale.models.reuse import ModelSnapshot


def _save_llama(folder, hidden: int, layers: int, vocab: int = 128) -> int:
    """A random llama saved as float32 safetensors (+ the tiny tokenizer); its weight bytes."""
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, vocab_size=vocab,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256)
    model = T.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _load(folder, **kw):
    cfg = ModelConfig(name="m", path=str(folder), device="cpu", placement="streamed", **kw)
    return load_model(cfg)[0]


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _resident(runs) -> np.ndarray:
    """Pages within ``runs`` that this process has mapped in (read since they were dropped)."""
    pages = []
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        for first, stop in runs:
            f.seek(first * 8)
            entry = np.frombuffer(f.read((stop - first) * 8), dtype=np.uint64)
            pages.append(first + np.flatnonzero((entry >> 63) & 1))
    return np.concatenate(pages)


pytestmark = pytest.mark.skipif(not mm.can_track_writes(), reason="needs /proc/self/pagemap")


def test_streamed_weights_are_views_of_the_checkpoint(tmp_path):
    _save_llama(tmp_path, hidden=32, layers=2)
    model = _load(tmp_path)
    mappings = mm.file_mappings()
    held = {mm.mapping_of(p.data, mappings) for p in model.parameters()}
    assert None not in held and {m.path for m in held} == {str(tmp_path / "model.safetensors")}
    assert mm.weights_of(model) == "mapped"
    # converted to another dtype, copied to process memory: recorded as such
    assert mm.weights_of(_load(tmp_path, dtype="bfloat16")) == "copied"
    assert mm.describe_weights(copy.deepcopy(model)) == "copied"


def test_a_mapped_load_takes_no_process_memory_for_weights(tmp_path):
    weight_bytes = _save_llama(tmp_path, hidden=1024, layers=3, vocab=8192)   # ~190 MB
    del_me = _load(tmp_path)   # imports and first-use allocations are not what is measured
    del del_me
    gc.collect()
    anon, file = _rss("RssAnon"), _rss("RssFile")
    model = _load(tmp_path)   # load_model reads every weight (its finiteness check)
    grown_anon, grown_file = _rss("RssAnon") - anon, _rss("RssFile") - file
    # thresholds at a quarter of the weights: the allocator's own noise here is up to ~35 MB
    # (freed heap kept or reused between loads), a copy would be all of them
    assert grown_anon < weight_bytes / 4 and grown_file > weight_bytes / 2
    del model
    gc.collect()
    anon = _rss("RssAnon")
    copied = _load(tmp_path, dtype="bfloat16")   # converted: the copy is the process's own
    assert _rss("RssAnon") - anon > weight_bytes / 4   # bf16: half the bytes, minus reuse
    del copied


def test_mapped_and_copied_models_give_the_same_numbers_and_restore(tmp_path):
    """NLL, RTN and GPTQ weights bitwise those of the same model in process memory; after each
    method the snapshot puts the mapped model back to the file's bits, with no page left
    private (and so no copy of the weights kept anywhere)."""
    _save_llama(tmp_path, hidden=64, layers=2)
    mapped = _load(tmp_path)
    copied = copy.deepcopy(mapped)
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    stream = torch.randint(0, 128, (2000,), generator=torch.Generator().manual_seed(1))
    ev = EvalConfig(seqlen=128, batch_size=4)
    assert measure_perplexity(mapped, stream, ev).nll_sum == \
        measure_perplexity(copied, stream, ev).nll_sum
    snapshot = ModelSnapshot(mapped)
    assert {id(m.tensor) for m in snapshot.mapped} == {id(p) for p in mapped.parameters()}
    context = QuantContext(calibration=ids, calibration_hash="random")
    for method in (RTNConfig(format="int4_g32"), GPTQConfig(format="int4_g32", device="cpu")):
        quantized = copy.deepcopy(copied)
        quantize(quantized, method, context)
        quantize(mapped, method, context)
        expected, got = quantized.state_dict(), mapped.state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected), method.name
        assert mm.written_pages(snapshot.runs).size > 0   # written in place: private pages
        written, clean = snapshot.restore()
        # every Linear was quantized; norms sharing a page with one count too
        assert clean and 14 <= written <= len(snapshot.mapped)
        assert mm.written_pages(snapshot.runs).size == 0
        assert all(torch.equal(v, got[k]) for k, v in copied.state_dict().items())
    assert mm.describe_weights(mapped) == "mapped"


def test_restoring_a_mapped_model_touches_only_the_changed_blocks(tmp_path):
    _save_llama(tmp_path, hidden=256, layers=4)
    model = _load(tmp_path)
    snapshot = ModelSnapshot(model)
    assert sum(t.host.numel() for t in snapshot.tensors) < 1000   # copies of buffers only
    blocks = model.model.layers
    pages = {i: mm.page_runs(mm.byte_range(p) for p in blocks[i].parameters()) for i in range(4)}
    # forget which pages loading read (they stay in the page cache): the test sees new reads
    mm.discard_writes(np.concatenate([np.arange(a, b) for a, b in snapshot.runs]))
    assert _resident(snapshot.runs).size == 0
    # a job: block 1 written in place (RTN on any device), block 2 rebound (GPTQ's onloaded
    # block coming back from the GPU)
    in_place = [m.weight for m in blocks[1].modules() if isinstance(m, torch.nn.Linear)]
    for w in in_place:
        w.data.mul_(0.5)
    for p in blocks[2].parameters():
        p.data = p.data * 2
    # counted: the rebound tensors and every tensor on a page written to
    hit = {p for w in in_place for p in range(*mm.pages_of(mm.byte_range(w)))}
    expected = len(list(blocks[2].parameters())) + sum(
        bool(hit & set(range(*m.pages))) for m in snapshot.mapped
        if not any(m.tensor is p for p in blocks[2].parameters()))
    written, clean = snapshot.restore()
    assert clean and written == expected and 7 + 9 <= expected <= 7 + 9 + 4
    # unchanged blocks were not read (nor copied: no snapshot copy exists). The kernel maps
    # cached pages around a faulting one in too (fault-around, 64 KiB), so the pages within
    # 32 of the changed blocks are left out
    resident = _resident(snapshot.runs)
    (a0, b0), = pages[0]
    (a3, b3), = pages[3]
    assert b0 - a0 > 500 and not np.isin(resident, np.r_[a0:b0 - 32, a3 + 32:b3]).any()
    assert mm.written_pages(snapshot.runs).size == 0
    mappings = mm.file_mappings()
    assert all(mm.mapping_of(p.data, mappings) for p in blocks[2].parameters())
    fresh = _load(tmp_path).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in model.state_dict().items())


def test_a_conversion_that_cannot_fit_the_host_is_refused_before_loading(tmp_path, monkeypatch):
    weight_bytes = _save_llama(tmp_path, hidden=32, layers=2)   # float32
    assert mm.copied_bytes([str(tmp_path / "model.safetensors")], "bfloat16") == \
        (weight_bytes // 2, weight_bytes)
    assert mm.copied_bytes([str(tmp_path / "model.safetensors")], "float32") == (0, weight_bytes)
    monkeypatch.setattr(mm, "available_host_bytes", lambda: weight_bytes // 4)
    with pytest.raises(ConfigError, match=r"model.dtype=bfloat16 converts .* model.dtype=auto"):
        _load(tmp_path, dtype="bfloat16")
    assert mm.weights_of(_load(tmp_path, dtype="auto")) == "mapped"   # needs no host memory


@pytest.mark.parametrize("method", [RTNConfig(format="int4_g32"),
                                    GPTQConfig(format="int4_g32", device="cpu")],
                         ids=["rtn", "gptq"])
def test_spilled_weights_leave_host_memory_and_change_no_number(tmp_path, method):
    """With a spill folder the quantized weights are views of (unlinked) files, not process
    memory: the same bits as without, and the snapshot still puts the model back."""
    _save_llama(tmp_path / "ckpt", hidden=256, layers=3)
    mapped = _load(tmp_path / "ckpt")
    copied = copy.deepcopy(mapped)
    snapshot = ModelSnapshot(mapped)
    mm.set_spill(mapped, str(tmp_path / "spill"))
    context = QuantContext(calibration=torch.randint(0, 128, (4, 64)), calibration_hash="r")
    quantize(copied, method, context)
    quantize(mapped, method, context)
    expected, got = copied.state_dict(), mapped.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    mappings = mm.file_mappings()
    linears = [m.weight for m in mapped.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    spilled = {mm.mapping_of(w.data, mappings).path for w in linears}
    assert len(spilled) == len(linears) and all(p.endswith("(deleted)") for p in spilled)
    assert list((tmp_path / "spill").iterdir()) == []   # unlinked: freed with the weights
    # of the checkpoint's pages, at most the two a weight shares with a neighbour stay private
    assert mm.written_pages(snapshot.runs).size <= 2 * len(linears)
    written, clean = snapshot.restore()
    assert clean and written >= len(linears) and mm.written_pages(snapshot.runs).size == 0
    fresh = _load(tmp_path / "ckpt").state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in mapped.state_dict().items())


def test_the_host_memory_check_counts_the_shards_the_index_names(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, vocab_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = T.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(tmp_path)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    converted, _ = mm.copied_bytes([str(s) for s in shards], "bfloat16")
    # a consolidated copy of all weights, as some hub repos ship, is not loaded
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              tmp_path / "consolidated.safetensors")
    monkeypatch.setattr(mm, "available_host_bytes", lambda: int(1.5 * converted))
    assert mm.weights_of(_load(tmp_path, dtype="bfloat16")) == "copied"
    monkeypatch.setattr(mm, "available_host_bytes", lambda: int(0.5 * converted))
    with pytest.raises(ConfigError, match="converts"):
        _load(tmp_path, dtype="bfloat16")


def test_a_spilled_copy_is_put_back_in_memory(tmp_path):
    """Weights converted on load (copies) are spilled too; the snapshot then binds them to
    copies in memory again, so the spill files' mappings go."""
    _save_llama(tmp_path / "ckpt", hidden=64, layers=2)
    model = _load(tmp_path / "ckpt", dtype="bfloat16")
    original = copy.deepcopy(model.state_dict())
    snapshot = ModelSnapshot(model)
    mm.set_spill(model, str(tmp_path / "spill"))
    quantize(model, RTNConfig(format="int4_g32"), QuantContext())
    linears = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert all(mm.mapping_of(w.data, mm.file_mappings()) for w in linears)
    written, clean = snapshot.restore()
    assert clean and written == len(linears)
    assert mm.describe_weights(model) == "copied"
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


@pytest.mark.gpu
@pytest.mark.parametrize("method", [RTNConfig(format="int4_g32"),
                                    GPTQConfig(format="int4_g32", device="cuda")],
                         ids=["rtn", "gptq"])
def test_streamed_on_cuda_spills_and_restores(tmp_path, method, monkeypatch):
    """On CUDA RTN writes the rounded weights back in place, GPTQ brings blocks back as new
    copies: both end in spill files, agree with a copy in memory, and are put back. (A model
    this small would be pinned for speed, which copies it: pinning is off here, as it is for
    a model beyond half of the host's available memory, the case mapping is for.)"""
    import ptqscale.models.streaming as streaming

    monkeypatch.setattr(streaming, "PIN_HOST_FRACTION", 0.0)
    _save_llama(tmp_path / "ckpt", hidden=256, layers=3)
    mapped = load_model(ModelConfig(name="m", path=str(tmp_path / "ckpt"), device="cuda",
                                    placement="streamed"))[0]
    assert mm.weights_of(mapped) == "mapped"
    copied = copy.deepcopy(mapped)
    snapshot = ModelSnapshot(mapped)
    mm.set_spill(mapped, str(tmp_path / "spill"))
    context = QuantContext(calibration=torch.randint(0, 128, (4, 64)), calibration_hash="r")
    quantize(copied, method, context)
    quantize(mapped, method, context)
    expected, got = copied.state_dict(), mapped.state_dict()
    for k in expected:   # the same code on the same device: at most a rare rounding flip
        assert (expected[k] != got[k]).float().mean() < 1e-3, k
    linears = [m.weight for m in mapped.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    mappings = mm.file_mappings()
    assert all(mm.mapping_of(w.data, mappings).path.endswith("(deleted)") for w in linears)
    written, clean = snapshot.restore()
    assert clean and mm.written_pages(snapshot.runs).size == 0
    fresh = _load(tmp_path / "ckpt").state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in mapped.state_dict().items())
