"""GPTQ speed, peak GPU memory and quality: ptqscale's GPTQ next to llm-compressor's.

Usage::

    python bench/bench_gptq.py --out DIR [--smoke] [--trained PATH] [--no-llmc]

1. Timing on a ~1.1B-parameter Llama (TinyLlama-1.1B's shape, random bf16 weights, seeded),
   128 x 2048 random calibration tokens, 4-bit symmetric int, group 128. Each method gets a
   fresh copy of the same model on the GPU; wall time of the whole quantization call and
   ``torch.cuda.max_memory_allocated`` (the model's own 2.2 GB included) are recorded.
2. NLL on a trained model (``--trained``: a local HF folder or .gguf; default stories260K from
   the package assets), calibrated on held-apart text of the same corpus, both methods with the
   same tokens, format and settings.

Settings are matched to llm-compressor's ``GPTQModifier(scheme="W4A16")`` defaults: its grid
is symmetric int4 with codes -8..7 and scale amax/7.5 per group of 128 (our ``int4_g128_full``),
act-order "static" (our ``actorder=true, static_groups=true``), damping 0.01, block 128,
quantized outputs propagated to the next layer (our default ``fp_inputs=false``), and the
Hessians of a block's linears collected in one pass (our ``true_sequential=false``). Its
calibration batch size is set to ours. llm-compressor runs when importable (see
bench/README.md for its wheels); otherwise its column says why it is missing.

Writes ``DIR/bench_gptq.md`` (table) and ``DIR/bench_gptq.json`` (device, date, versions,
numbers). ``--smoke`` runs tiny sizes on CPU in about a minute.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import tempfile
import time
import traceback

import torch

from ptqscale.methods import GPTQConfig, QuantContext, RTNConfig, quantize
from ptqscale.metrics import EvalConfig, measure_perplexity

FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
SMOKE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU is fine")
    p.add_argument("--trained", default=None, help="trained model path (default stories260K)")
    p.add_argument("--no-llmc", action="store_true", help="skip llm-compressor")
    p.add_argument("--format", default="int4_g128_full")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-nll", action="store_true")
    p.add_argument("--llmc-fp16-scales", action="store_true",
                   help="llm-compressor with fp16 scales (our INT formats'): the parity check of "
                        "bench_gptq_parity.py; its weights are then ours")
    return p.parse_args()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ours_config(args) -> GPTQConfig:
    # matched to llm-compressor: static act-order, and (as its sequential pipeline) every
    # Hessian of a block from one pass before the block's weights change
    return GPTQConfig(format=args.format, actorder=True, static_groups=True,
                      true_sequential=False, batch_size=args.batch_size, device=str(device()))


def measured(fn):
    """(result, wall seconds, peak GPU bytes or None) of fn(); errors become a note."""
    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as err:  # a failing competitor must not lose the other numbers
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}, None, None
    if cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0, (torch.cuda.max_memory_allocated() if cuda else None)


# ---- the two methods -------------------------------------------------------------------------
def run_ours(model, ids, args) -> dict:
    report = quantize(model, ours_config(args), QuantContext(calibration=ids))
    return {"layers": len(report.layers), "damp_retries": report.extra["damp_retries"]}


def llmc_available() -> str | None:
    try:
        import llmcompressor  # noqa: F401
        from llmcompressor.modifiers.gptq import GPTQModifier  # noqa: F401
    except Exception as err:
        return f"llm-compressor not importable ({type(err).__name__}: {err})"
    return None


def llmc_scheme(fmt_name: str, fp16_scales: bool = False):
    """compressed-tensors scheme equal to our int<b>_g<g>_full (or per-channel int<b>_full);
    its scales are in the weights' dtype unless ``fp16_scales`` (ours: fp16)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from ptqscale.formats import get_format

    fmt = get_format(fmt_name)
    if fmt.family != "int" or fmt.mode != "full" or fmt.per_tensor:
        raise ValueError(f"llm-compressor comparison needs an int<b>[_g<g>]_full format, got "
                         f"{fmt_name}")
    kw = dict(scale_dtype=torch.float16) if fp16_scales else {}
    if fmt.block_size is None:
        weights = QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=True,
                                   strategy="channel", **kw)
    else:
        weights = QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=True,
                                   strategy="group", group_size=fmt.block_size, **kw)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def run_llmc(model, ids, args, tokenizer=None) -> dict:
    """llm-compressor's GPTQ; ``tokenizer`` is only required by its API (ids are pre-tokenized)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    data = Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})
    scheme = llmc_scheme(args.format, getattr(args, "llmc_fp16_scales", False))
    recipe = GPTQModifier(config_groups={"group_0": scheme},
                          ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                          actorder="static")
    if tokenizer is None:
        from ptqscale.assets import DATA
        from ptqscale.models import load_gguf_tokenizer

        tokenizer = load_gguf_tokenizer(str(DATA / "models" / "stories260K" / "stories260K.gguf"))
    # oneshot re-reads the config from model.config.name_or_path on disk: give it one there
    # (a GGUF-loaded model carries a "gguf" quantization_config, which oneshot refuses: the
    # weights were de-quantized to float on load, so drop it on this copy)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    config_dir = tempfile.mkdtemp(prefix="llmc-config-")
    model.config.save_pretrained(config_dir)
    model.config._name_or_path = config_dir
    oneshot(model=model, processor=tokenizer, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], batch_size=args.batch_size,
            shuffle_calibration_samples=False, pipeline="sequential")
    n = sum(hasattr(m, "weight_scale") for m in model.modules())
    return {"layers": n}


# ---- 1. timing ---------------------------------------------------------------------------
def timing(args, llmc_note: str | None) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SMOKE if args.smoke else FULL
    nsamples = args.nsamples or (4 if args.smoke else 128)
    seqlen = args.seqlen or (64 if args.smoke else 2048)
    ids = torch.randint(0, shape["vocab_size"], (nsamples, seqlen),
                        generator=torch.Generator().manual_seed(0))
    dtype = torch.float32 if args.smoke else torch.bfloat16

    def fresh():
        torch.manual_seed(0)
        cfg = LlamaConfig(**shape, tie_word_embeddings=False, torch_dtype=dtype)
        return LlamaForCausalLM(cfg).to(dtype).to(device()).eval()

    rows = []
    runners = [("ptqscale", run_ours, None), ("llm-compressor", run_llmc, llmc_note)]
    for name, fn, skip in runners:
        row = {"part": "timing", "method": name, "nsamples": nsamples,
               "seqlen": seqlen, "format": args.format}
        if skip:
            row["note"] = skip
        else:
            model = fresh()
            row["params"] = sum(p.numel() for p in model.parameters())
            result, secs, peak = measured(lambda m=model, f=fn: f(m, ids, args))
            row.update(seconds=secs, peak_gib=None if peak is None else peak / 2**30, **result)
            del model
        rows.append(row)
        print(row, flush=True)
    return rows


# ---- 2. quality on a trained model ---------------------------------------------------------
def trained_model(args):
    from ptqscale.assets import DATA
    from ptqscale.data import CalibConfig, DataConfig, sample_calibration, tokenize_corpus
    from ptqscale.models import ModelConfig, load_model

    path = args.trained or str(DATA / "models" / "stories260K" / "stories260K.gguf")
    model, tok = load_model(ModelConfig(name="trained", path=path, max_seqlen=512 if
                                        args.trained is None else None, device=str(device())))
    corpus = str(DATA / "tinystories-valid-sample")
    if args.trained is None:  # in-domain: calibrate on the first 3000 stories, score the tail
        calib = DataConfig("tinystories", "validation", path=corpus, max_documents=3000)
        stream = tokenize_corpus(DataConfig("tinystories", "validation", path=corpus), tok, None,
                                 preset="gptq")[-16384:]
        seqlen = 256
    else:  # calibrate on Gutenberg (valid), score WikiText-2 test
        calib = DataConfig("gutenberg", "valid", path=str(DATA / "gutenberg-en"))
        stream = tokenize_corpus(DataConfig("wikitext2", "test", path=str(DATA / "wikitext-2-raw")),
                                 tok, None, preset="gptq")
        seqlen = 2048
    nsamples = 8 if args.smoke else 128
    seqlen = 64 if args.smoke else seqlen
    ids, _ = sample_calibration(CalibConfig(calib, nsamples=nsamples, seqlen=seqlen, seed=0),
                                tok, None)
    ev = EvalConfig(seqlen=seqlen, batch_size=8, max_tokens=8 * seqlen if args.smoke else None)
    return model, tok, ids, stream, ev, path


def nll_format(model, name: str) -> str:
    """``name``, or its per-channel version when its group does not divide every linear's
    input features (stories260K: 64 and 172), which compressed-tensors refuses."""
    from ptqscale.formats import get_format
    from ptqscale.models import get_anatomy

    g = get_format(name).block_size
    widths = {m.in_features for m in get_anatomy(model).targets.values()}
    if g is None or all(w % g == 0 for w in widths):
        return name
    return f"int{get_format(name).bits}_full"


def quality(args, llmc_note: str | None) -> list[dict]:
    model, tok, ids, stream, ev, path = trained_model(args)
    args = copy.copy(args)
    args.format = nll_format(model, args.format)
    fp = measure_perplexity(model, stream, ev).nll
    rows = [{"part": "nll", "method": "full precision", "model": path, "nll": fp}]
    runners = [("rtn", lambda m: quantize(m, RTNConfig(format=args.format)), None),
               ("ptqscale", lambda m: run_ours(m, ids, args), None),
               ("llm-compressor", lambda m: run_llmc(m, ids, args, tok), llmc_note)]
    for name, fn, skip in runners:
        row = {"part": "nll", "method": name, "model": path, "format": args.format,
               "nsamples": ids.shape[0], "seqlen": ids.shape[1]}
        if skip:
            row["note"] = skip
        else:
            m = copy.deepcopy(model)
            result, secs, _ = measured(lambda m=m, f=fn: f(m))
            row.update(seconds=secs, **(result if isinstance(result, dict) else {}))
            if "error" not in row:
                row["nll"] = measure_perplexity(m, stream, ev).nll
                row["dnll"] = row["nll"] - fp
        rows.append(row)
        print(row, flush=True)
    return rows


# ---- output ----------------------------------------------------------------------------------
def environment() -> dict:
    import transformers

    cuda = torch.cuda.is_available()
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor()})",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    try:
        import llmcompressor

        env["llmcompressor"] = llmcompressor.__version__
    except Exception:
        env["llmcompressor"] = None
    return env


def fmt_num(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(env: dict, rows: list[dict]) -> str:
    lines = [f"# GPTQ benchmark ({env['device']}, {env['date']})", "",
             f"torch {env['torch']}, transformers {env['transformers']}, "
             f"llm-compressor {env['llmcompressor']}", "",
             "| part | method | seconds | peak GPU GiB | NLL | dNLL vs fp | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        note = r.get("note") or r.get("error") or ""
        lines.append(f"| {r['part']} | {r['method']} | {fmt_num(r.get('seconds'), '.1f')} | "
                     f"{fmt_num(r.get('peak_gib'), '.2f')} | {fmt_num(r.get('nll'), '.4f')} | "
                     f"{fmt_num(r.get('dnll'), '.4f')} | {note} |")
    lines += ["", *summary(rows)]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> list[str]:
    def get(part, method, key):
        return next((r.get(key) for r in rows if r["part"] == part and r["method"] == method),
                    None)

    out = []
    ours, theirs = get("timing", "ptqscale", "seconds"), get("timing", "llm-compressor", "seconds")
    if ours and theirs:
        out.append(f"Speed-up of ptqscale over llm-compressor: {theirs / ours:.2f}x (target >= 2x).")
    a, b = get("nll", "ptqscale", "nll"), get("nll", "llm-compressor", "nll")
    if a and b:
        out.append(f"NLL ptqscale vs llm-compressor: {100 * (a - b) / b:+.2f}% (target within 0.5%).")
    return out


def main() -> None:
    args = parse()
    os.makedirs(args.out, exist_ok=True)
    llmc_note = "skipped (--no-llmc)" if args.no_llmc else llmc_available()
    env = environment()
    rows = []
    if not args.skip_timing:
        rows += timing(args, llmc_note)
    if not args.skip_nll:
        rows += quality(args, llmc_note)
    with open(os.path.join(args.out, "bench_gptq.json"), "w") as f:
        json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "bench_gptq.md"), "w") as f:
        f.write(table(env, rows))
    print(table(env, rows))


if __name__ == "__main__":
    main()
