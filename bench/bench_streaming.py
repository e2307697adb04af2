"""Models larger than the GPU: time and peak GPU memory in one piece, streamed, spread (19, 25).

Usage::

    python bench/bench_streaming.py --shape 1b --out DIR/streaming_1b.jsonl
    python bench/bench_streaming.py --shape llama3-8b --placements streamed \\
        --max-gpu-memory 4GiB --stages ppl,rtn,gptq --out DIR/streaming_8b.jsonl
    python bench/bench_streaming.py --shape llama3-8b --placements streamed \
        --max-gpu-memory 4GiB --stages noise,hessian --landscape-seqlen 512 \
        --out DIR/streaming_8b_landscape.jsonl
    python bench/bench_streaming.py --shape llama3-8b --placements streamed --mmap \
        --max-gpu-memory 4GiB --stages ppl,rtn,gptq --tokens 32768 --nsamples 32 \
        --out DIR/streaming_8b_mmap.jsonl
    python bench/bench_streaming.py --shape 1b --placements streamed,spread --gpus 2 \
        --stages ppl,rtn,gptq --compare-weights --out DIR/spread_1b_2gpu.jsonl   # issue 25
    python bench/bench_streaming.py --dry-run --out /tmp/streaming.jsonl   # tiny, CPU

A randomly initialised Llama of the given shape (built from a config: no download), bf16 by
default, seeded. For each placement (``one``: the whole model on the GPU; ``streamed``: the
weights on the CPU, one decoder block at a time on the GPU; ``spread``: whole decoder blocks on
``--gpus`` GPUs, each computing where it lives; ptqscale's own ``place_model`` with
``model.max_gpu_memory`` enforced, per GPU when spread) the stages run in order on the same
weights:

- ``ppl``: perplexity (gptq preset) of a synthetic token stream (``--tokens``, ``--seqlen``);
- ``rtn``: RTN into ``--format`` (int4_g128), then ``ppl_rtn``: the quantized model's perplexity;
- ``gptq``: GPTQ into ``--format`` on ``--nsamples`` x ``--seqlen`` synthetic calibration
  tokens (from the original weights), then ``ppl_gptq``;
- ``noise``: the noise response (``measure_noise_response``: NLL at ``--noise-levels`` dB of
  weight SQNR, one antithetic draw each, kappa) and ``hessian``: the Hutchinson trace with
  ``--probes`` probes and, with ``--power-iters`` > 0, the top eigenvalue
  (``measure_hessian``, fp32, exact HVPs; streamed: forward-over-reverse block by block), both
  on the first ``--landscape-tokens`` tokens of the stream in windows of ``--landscape-seqlen``
  and run before any quantization (the landscape of the original weights).

``--mmap`` (streamed only): the model is saved as safetensors (``--mmap-dir``, default a
temporary folder, removed afterwards), freed, and loaded back with ``load_model`` in its own
dtype, so its weights are views of the file (models/mapped.py); instead of a copy of the
weights, a reuse snapshot (models/reuse.py) undoes each quantization (stage ``restore``:
seconds, tensors restored). Rows then show how little host memory the weights take;
``--spill-dir`` also sends the quantized weights to that folder (``paths.spill``).

Each measurement is one JSON line (stage, placement, seconds, peak GPU GiB allocated and
reserved, host memory of the process: RssAnon (its own) and RssFile (file pages such as mapped
weights, reclaimable) in GiB, NLL, status; a stage that fails, e.g. over the budget, is a
``failed`` line and the run goes on), printed and appended to ``--out``; the first line (after
``--mmap``'s save and load) describes the run (device, date, versions, shape, parameters); a
spread ``place`` line has the device map used. The NLLs of all placements must agree to float
rounding; with ``--compare-weights`` each quantization line says how many weights equal those
of the first placement's same method (kept on the CPU).
Needs only torch and transformers (and ptqscale from ``src/``: ``PYTHONPATH=$PWD/src``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

# Under a small budget the caching allocator's fixed segments fragment (a GiB reserved but
# unusable at 4 GiB); growable segments keep what is reserved usable. Set before CUDA starts.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

SHAPES = {  # Llama shapes: hidden, layers, ffn, heads, kv heads, vocab
    "tiny": dict(hidden_size=64, num_hidden_layers=3, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "3b": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192,
               num_attention_heads=24, num_key_value_heads=8, vocab_size=128256),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "14b": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824,
                num_attention_heads=40, num_key_value_heads=8, vocab_size=128256),
    "32b": dict(hidden_size=5120, num_hidden_layers=64, intermediate_size=27648,
                num_attention_heads=40, num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 2**30


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON-lines file (appended to)")
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--placements", default="one,streamed",
                   help="comma list of one,streamed,spread")
    p.add_argument("--gpus", type=int, default=None, help="spread: GPUs to use (default: all)")
    p.add_argument("--compare-weights", action="store_true",
                   help="compare quantized weights with the first placement's (host memory)")
    p.add_argument("--max-gpu-memory", default=None,
                   help="e.g. 4GiB (streamed and spread runs only; per GPU when spread)")
    p.add_argument("--budget-one", action="store_true", help="apply the budget to 'one' too")
    p.add_argument("--stages", default="ppl,rtn", help="comma list of ppl,noise,hessian,rtn,gptq")
    # WikiText-2 test is about 290k tokens under Llama-3's tokenizer
    p.add_argument("--tokens", type=int, default=262144, help="synthetic eval stream length")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8, help="eval windows per forward")
    p.add_argument("--format", default="int4_g128")
    p.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration sequences")
    p.add_argument("--method-batch-size", type=int, default=8,
                   help="GPTQ calibration sequences per forward (method.batch_size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--landscape-tokens", type=int, default=4096, help="noise/hessian budget")
    p.add_argument("--landscape-seqlen", type=int, default=None, help="default: --seqlen")
    p.add_argument("--noise-levels", default="40,30,20", help="dB of weight SQNR")
    p.add_argument("--probes", type=int, default=4, help="Hutchinson probes")
    p.add_argument("--power-iters", type=int, default=0, help="top eigenvalue (0: skip)")
    p.add_argument("--hvp-windows", type=int, default=1, help="windows per HVP micro-batch")
    p.add_argument("--no-pin", action="store_true",
                   help="keep streamed host weights pageable (streaming.PIN_HOST_FRACTION=0): "
                        "what a model beyond half of the host's memory gets")
    p.add_argument("--mmap", action="store_true",
                   help="save, then load the model memory-mapped (streamed placement only)")
    p.add_argument("--mmap-dir", default=None, help="where --mmap saves (default: a temp dir)")
    p.add_argument("--spill-dir", default=None,
                   help="with --mmap: paths.spill, where quantized weights go (memory-mapped)")
    p.add_argument("--dry-run", action="store_true", help="tiny shape, CPU, small stream")
    args = p.parse_args(argv)
    if args.dry_run:
        args.shape, args.tokens, args.seqlen, args.batch_size, args.nsamples = \
            "tiny", 2048, 128, 4, 8
        args.landscape_tokens, args.power_iters = 512, 3
        if args.stages == p.get_default("stages"):
            args.stages = "ppl,noise,hessian,rtn,gptq"  # every stage, unless asked otherwise
    args.landscape_seqlen = args.landscape_seqlen or args.seqlen
    if args.mmap and args.placements != "streamed":
        p.error("--mmap measures a streamed model: give --placements streamed")
    if args.spill_dir and not args.mmap:
        p.error("--spill-dir needs --mmap")
    if args.landscape_tokens < args.landscape_seqlen:
        p.error(f"--landscape-tokens={args.landscape_tokens} is less than one window "
                f"(--landscape-seqlen={args.landscape_seqlen})")
    return args


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(args) -> torch.nn.Module:
    """Random-init Llama on the CPU, seeded (initialised on the GPU when there is one: fast)."""
    import transformers as T

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = T.LlamaConfig(**shape, max_position_embeddings=max(args.seqlen, 2048),
                           tie_word_embeddings=False)
    with torch.device("meta"):
        n = sum(p.numel() for p in T.AutoModelForCausalLM.from_config(config).parameters())
    nbytes = n * torch.finfo(DTYPES[args.dtype]).bits // 8
    dev = device()
    if dev.type == "cuda" and nbytes > 0.8 * torch.cuda.mem_get_info(dev)[0]:
        dev = torch.device("cpu")  # too big to initialise on the GPU: slower, on the CPU
    torch.manual_seed(args.seed)
    with dev:
        model = T.AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype])
    model = model.to("cpu").eval().requires_grad_(False)
    release()
    return model


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def header(args, model) -> dict:
    import transformers

    dev = device()
    return {"kind": "run", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.machine(),
            "gpu_total_gib": (torch.cuda.get_device_properties(dev).total_memory / GIB
                              if dev.type == "cuda" else None),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "shape": args.shape, "config": vars(args),
            "gpus_visible": torch.cuda.device_count() if dev.type == "cuda" else 0,
            "params": sum(p.numel() for p in model.parameters()),
            "weight_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / GIB}


def emit(out: Path, row: dict) -> None:
    line = json.dumps(row, default=str)
    print(line, flush=True)
    with out.open("a") as f:
        f.write(line + "\n")


def measure(fn) -> dict:
    """Wall seconds and peak GPU memory of ``fn()``; an error becomes a ``failed`` row."""
    release()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    row: dict = {"status": "ok"}
    try:
        row.update(fn() or {})
    except Exception as e:  # a stage over the budget is a result, not the end of the run
        row = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:500]}",
               "traceback": traceback.format_exc()[-1500:]}
    if cuda:
        torch.cuda.synchronize()
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    row["seconds"] = time.perf_counter() - start
    return {**row, **host_memory()}


def host_memory() -> dict:
    """This process's resident host memory in GiB: its own (RssAnon) and mapped file pages
    (RssFile: memory-mapped weights read so far, reclaimable page cache)."""
    row = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                row[f"{key.lower()}_gib"] = int(value.split()[0]) * 1024 / GIB
    return row


def load_mapped(args, out: Path):
    """``--mmap``: the random model saved as safetensors (with a character tokenizer, which
    load_model wants), freed, and loaded back streamed in its own dtype: memory-mapped."""
    import tempfile

    import transformers as T
    from tokenizers import Tokenizer, models

    from ptqscale.models import ModelConfig, load_model
    from ptqscale.models.mapped import weights_of

    folder = Path(args.mmap_dir or tempfile.mkdtemp(prefix="bench_mmap_"))
    model = build_model(args)
    row = measure(lambda m=model: m.save_pretrained(folder))
    backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    T.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)
    emit(out, {"kind": "measurement", "shape": args.shape, "stage": "save", **row})
    del model
    release()
    cfg = ModelConfig(name=f"random-{args.shape}", path=str(folder), device=str(device()),
                      dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype],
                      placement="streamed", max_gpu_memory=args.max_gpu_memory)
    loaded = {}
    row = measure(lambda: loaded.update(model=load_model(cfg)[0]))
    emit(out, {"kind": "measurement", "shape": args.shape, "stage": "load_mapped",
               "weights": weights_of(loaded["model"]), **row})
    return loaded["model"], folder


def run_placement(args, out: Path, model, original: dict, placement: str, stream, calib,
                  reference: dict):
    from ptqscale.methods import GPTQConfig, QuantContext, RTNConfig, quantize
    from ptqscale.metrics import EvalConfig, measure_perplexity
    from ptqscale.models import ModelConfig, place_model

    budget = args.max_gpu_memory if (placement != "one" or args.budget_one) else None
    base = {"kind": "measurement", "shape": args.shape, "placement": placement,
            "max_gpu_memory": budget, "dtype": args.dtype}
    cfg = ModelConfig(name=f"random-{args.shape}", path="random-init", device=str(device()),
                      dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype],
                      placement=placement, max_gpu_memory=budget,
                      gpus=args.gpus if placement == "spread" else None)
    ev = EvalConfig(seqlen=args.seqlen, batch_size=args.batch_size)

    def ppl():
        res = measure_perplexity(model, stream, ev)
        return {"nll": res.nll, "nll_sum": res.nll_sum, "tokens": res.tokens}

    def restore():
        if original is None:
            return
        if not isinstance(original, dict):   # a reuse snapshot of a mapped model
            emit(out, {**base, "stage": "restore", **measure(
                lambda: dict(zip(("tensors_restored", "clean"), original.restore())))})
            return
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(original[k])

    def place():
        from ptqscale.models.spread import describe

        p = place_model(model, cfg)
        return {"streamed": p.streamed, "device_map": describe(p.device_map) if p.spread else None}

    placed = measure(place)
    emit(out, {**base, "stage": "place", **placed})
    stages = args.stages.split(",") if placed["status"] == "ok" else []
    if "ppl" in stages:
        emit(out, {**base, "stage": "ppl", **measure(ppl)})
    for name in ("noise", "hessian"):
        if name in stages:
            emit(out, {**base, "stage": name, **measure(lambda n=name: landscape(args, model, stream, n))})
    for name in ("rtn", "gptq"):
        if name not in stages:
            continue
        if name == "rtn":
            method, ctx = RTNConfig(format=args.format), QuantContext()
        else:
            # under a budget the calibration activations wait on the CPU between blocks
            method = GPTQConfig(format=args.format, device=str(device()),
                                offload=budget is not None, batch_size=args.method_batch_size)
            ctx = QuantContext(calibration=calib, calibration_hash="synthetic")
        row = measure(lambda m=method, c=ctx: {"weight_sqnr_db": quantize(model, m, c).weight_sqnr_db})
        if args.compare_weights and row["status"] == "ok":
            row.update(compare_weights(model, reference, name))
        emit(out, {**base, "stage": name, **row})
        emit(out, {**base, "stage": f"ppl_{name}", **measure(ppl)})
        restore()
    # back to the CPU, the cap lifted, for the next placement
    if placement == "spread" and placed["status"] == "ok":
        from ptqscale.models.spread import unspread

        unspread(model)
    model.to("cpu")
    release()
    from ptqscale.models.streaming import apply_memory_budget

    apply_memory_budget(device(), None)


def compare_weights(model, reference: dict, method: str) -> dict:
    """The first placement keeps its quantized weights (CPU) as the reference of ``method``;
    later ones report the fraction of weight elements equal to it and the largest difference."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if method not in reference:
        reference[method] = state
        return {"weights_reference": True}
    ref = reference[method]
    equal = sum(int((state[k] == ref[k]).sum()) for k in ref)
    total = sum(ref[k].numel() for k in ref)
    diff = max(float((state[k].float() - ref[k].float()).abs().max()) for k in ref)
    return {"weights_equal_frac": equal / total, "weights_max_abs_diff": diff}


def landscape(args, model, stream: torch.Tensor, stage: str) -> dict:
    """The noise response or the Hessian features of the original weights (scalars only)."""
    from ptqscale.metrics.landscape import LandscapeConfig, measure_hessian, measure_noise_response
    from ptqscale.models import get_anatomy

    n = args.landscape_tokens // args.landscape_seqlen
    windows = stream[: n * args.landscape_seqlen].view(n, args.landscape_seqlen)
    cfg = LandscapeConfig(
        enabled=True, levels_db=[float(s) for s in args.noise_levels.split(",")], seeds=1,
        max_tokens=args.landscape_tokens, batch_size=args.batch_size,
        hutchinson_probes=args.probes, power_iters=args.power_iters, power_tol=0.0,
        hvp_windows=args.hvp_windows, hvp_retain_graph=False)
    measure_fn = measure_noise_response if stage == "noise" else measure_hessian
    feats = measure_fn(model, dict(get_anatomy(model).targets), windows, cfg)
    return {k: v for k, v in feats.items() if not isinstance(v, dict)}


def main(argv=None) -> None:
    args = parse(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = None
    if args.no_pin:
        import ptqscale.models.streaming as streaming

        streaming.PIN_HOST_FRACTION = 0.0
    if args.mmap:
        from ptqscale.models.reuse import ModelSnapshot

        model, folder = load_mapped(args, out)
        if args.spill_dir:
            from ptqscale.models.mapped import set_spill

            set_spill(model, args.spill_dir)
        original = ModelSnapshot(model)   # undoes quantizations without a copy of the weights
    else:
        model = build_model(args)
    emit(out, header(args, model))
    # a copy of the weights to undo each quantization, unless only one ever runs (big shapes:
    # host memory holds the model once)
    quant_runs = len(args.placements.split(",")) * len({"rtn", "gptq"} & set(args.stages.split(",")))
    if not args.mmap:
        original = ({k: v.clone() for k, v in model.state_dict().items()} if quant_runs > 1
                    else None)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    stream = torch.randint(0, vocab, (args.tokens,), generator=gen)
    calib = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=gen)
    reference: dict = {}  # --compare-weights: method -> the first placement's quantized weights
    for placement in args.placements.split(","):
        run_placement(args, out, model, original, placement, stream, calib, reference)
    del original
    release()
    if folder is not None and args.mmap_dir is None:
        import shutil

        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
