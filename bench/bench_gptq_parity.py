"""GPTQ quality parity with llm-compressor: the matrix (issue 23, "GPTQ parity").

Usage (in a venv with llm-compressor, bench/README.md "bench_gptq_parity.py")::

    python bench/bench_gptq_parity.py --out DIR [--members stories260k,...] [--formats ...]

For every model (the studies' ``sweeps/crossquant_model`` members: the model with its own
evaluation and calibration corpus), format and act-order setting, GPTQ runs on the SAME
calibration tokens (ptqscale's ``sample_calibration`` of the member's ``calib`` config) with
the same damping (0.01 of mean diag H) and block (128), and ptqscale's NLL pass scores every
model's weights on the same evaluation tokens. Columns (dNLL = NLL - full-precision NLL):

- ``ours``: ptqscale with llm-compressor's settings: scales fitted up front on the original
  weights (``static_groups``; llm-compressor's observer runs before GPTQ), one Hessian pass per
  decoder block (``true_sequential=false``, its sequential pipeline), quantized inputs
  propagated (``fp_inputs=false``), act-order ``static`` = our ``actorder=true``;
- ``llmc``: llm-compressor's ``GPTQModifier`` (its min-max observer; scales in the weights'
  dtype: fp32 here);
- ``llmc_fp16``: the same with ``scale_dtype=float16``, i.e. our INT formats' fp16 scales
  (INT formats only): the parity check, expected bitwise equal to ``ours``;
- ``ours_alt``: ``ours`` calibrated on the next ``--nsamples`` sequences of the same sample:
  how much dNLL moves between two calibration draws;
- ``ours_default``: ptqscale's defaults (lazy group fit, ``true_sequential=true``);
- ``rtn``: round to nearest (ptqscale), for scale.

INT formats use the ``_full`` grid (codes -2^(b-1)..2^(b-1)-1, scale amax/(2^b-1)*2), which is
compressed-tensors' symmetric grid. ``mxfp4`` and ``mxfp4_rn`` are both compared with
compressed-tensors' MXFP4 scheme, whose shared scale rounds amax to one mantissa bit before the
OCP rule: that is our ``mxfp4_rn``, while ``mxfp4`` is OCP's floor rule. llm-compressor refuses
groups that do not divide a layer's input width (checked before calibrating; the error is
recorded in the cell). Writes ``DIR/gptq_parity.md`` and ``DIR/gptq_parity.json``; the rows go
to ``DIR/gptq_parity.jsonl`` as they finish, and a re-run skips the cells already there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import tempfile
import time
import traceback

import torch

MEMBERS = "stories260k,gutenberg-llama-200k,gutenberg-llama-500k,gutenberg-llama-1m"
FORMATS = "int4_full,int3_full,int4_g32_full,int3_g32_full,mxfp4"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--members", default=MEMBERS)
    p.add_argument("--formats", default=FORMATS)
    p.add_argument("--actorder", default="off,static")
    p.add_argument("--methods", default="ours,llmc,llmc_fp16,ours_alt,ours_default,rtn")
    p.add_argument("--nsamples", type=int, default=None, help="first N calibration sequences "
                   "(default: the member's calib.nsamples)")
    p.add_argument("--max-tokens", type=int, default=65536, help="evaluation tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report-only", action="store_true", help="tables from DIR's jsonl")
    return p.parse_args()


# ---- one model: its spec, calibration and evaluation tokens ----------------------------------
def member(name: str, nsamples: int | None, max_tokens: int):
    from ptqscale.data import sample_calibration, tokenize_corpus
    from ptqscale.metrics import measure_perplexity
    from ptqscale.models import load_model
    from ptqscale.runner.config import register_configs
    from ptqscale.runner.job import validate_job
    from ptqscale.runner.planner import compose, hydra_context

    register_configs()
    with hydra_context():
        spec = validate_job(compose([f"+sweep/crossquant_model@_global_={name}", "method=gptq"]))
    model, tok = load_model(dataclasses.replace(spec.model, device="cpu"))
    ids, calib_hash = sample_calibration(spec.calib, tok, None)
    n = nsamples or ids.shape[0]
    # the next n sequences of the same sample: ``ours_alt``, the spread of dNLL over calibration
    # draws that a difference between the implementations is to be judged against
    alt = ids[n:2 * n] if ids.shape[0] >= 2 * n else None
    ids = ids[:n]
    stream = tokenize_corpus(spec.data, tok, None, preset=spec.eval.preset)
    ev = dataclasses.replace(spec.eval, max_tokens=max_tokens)
    fp = measure_perplexity(model, stream, ev).nll
    info = {"member": name, "model_path": spec.model.path, "calib": spec.calib.data.name,
            "calib_split": spec.calib.data.split, "nsamples": int(ids.shape[0]),
            "seqlen": int(ids.shape[1]), "calib_sha": calib_hash[:12] if calib_hash else None,
            "eval": spec.data.name, "eval_split": spec.data.split, "eval_tokens": max_tokens,
            "fp_nll": fp}
    return model, tok, (ids, alt), stream, ev, info


# ---- the methods ------------------------------------------------------------------------------
def run_ours(model, ids, fmt: str, actorder: bool, matched: bool) -> None:
    from ptqscale.methods import GPTQConfig, QuantContext, quantize

    extra = dict(static_groups=True, true_sequential=False) if matched else {}
    cfg = GPTQConfig(format=fmt, actorder=actorder, percdamp=0.01, blocksize=128,
                     device="cpu", kernel="torch", **extra)
    quantize(model, cfg, QuantContext(calibration=ids))


def run_rtn(model, ids, fmt: str, actorder: bool) -> None:
    from ptqscale.methods import RTNConfig, quantize

    quantize(model, RTNConfig(format=fmt))


def llmc_weights(fmt_name: str, fp16_scale: bool):
    """compressed-tensors QuantizationArgs for our format name (INT _full grids and mxfp4)."""
    from compressed_tensors.quantization import QuantizationArgs

    from ptqscale.formats import get_format

    fmt = get_format(fmt_name)
    if fmt_name in ("mxfp4", "mxfp4_rn"):  # _rn: compressed-tensors' own scale rule
        if fp16_scale:
            raise ValueError("llmc_fp16 applies to INT formats only")
        return QuantizationArgs(num_bits=4, type="float", strategy="group", symmetric=True,
                                group_size=32, scale_dtype=torch.uint8, zp_dtype=torch.uint8)
    if fmt.family != "int" or fmt.mode != "full" or fmt.per_tensor:
        raise ValueError(f"no llm-compressor scheme for {fmt_name} (int<b>[_g<g>]_full, mxfp4)")
    kw = dict(scale_dtype=torch.float16) if fp16_scale else {}
    if fmt.block_size is None:
        return QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=True,
                                strategy="channel", **kw)
    return QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=True, strategy="group",
                            group_size=fmt.block_size, **kw)


def run_llmc(model, ids, fmt: str, actorder: bool, tokenizer, fp16_scale: bool) -> None:
    from compressed_tensors.quantization import QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    from ptqscale.models import get_anatomy

    g = llmc_weights(fmt, fp16_scale).group_size
    widths = sorted({m.in_features for m in get_anatomy(model).targets.values()})
    if g and any(w % g for w in widths):  # checked here: it would fail after calibrating
        raise ValueError(f"llm-compressor needs groups that divide every input width "
                         f"({widths}), got {g}")
    scheme = QuantizationScheme(targets=["Linear"], weights=llmc_weights(fmt, fp16_scale))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                          block_size=128, dampening_frac=0.01,
                          actorder="static" if actorder else None)
    data = Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})
    # oneshot re-reads the config from model.config.name_or_path: give it one on disk (a GGUF
    # model's "gguf" quantization_config is dropped: its weights were de-quantized on load)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    config_dir = tempfile.mkdtemp(prefix="llmc-config-")
    model.config.save_pretrained(config_dir)
    model.config._name_or_path = config_dir
    oneshot(model=model, processor=tokenizer, dataset=data, recipe=recipe,
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], batch_size=8,
            shuffle_calibration_samples=False, pipeline="sequential")


def linear_weights(model) -> dict[str, torch.Tensor]:
    from ptqscale.models import get_anatomy

    return {n: m.weight.detach().clone() for n, m in get_anatomy(model).targets.items()}


def agreement(a: dict, b: dict) -> float:
    """Fraction of quantized linear weights equal in ``a`` and ``b``."""
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    return same / sum(a[n].numel() for n in a)


# ---- the matrix -------------------------------------------------------------------------------
def cells(args, done: set) -> list[dict]:
    from ptqscale.metrics import measure_perplexity

    rows = []
    methods = args.methods.split(",")
    out = open(os.path.join(args.out, "gptq_parity.jsonl"), "a")
    for name in args.members.split(","):
        loaded = None
        for fmt in args.formats.split(","):
            for ao in args.actorder.split(","):
                for method in methods:
                    key = (name, fmt, ao, method)
                    if key in done or (method == "rtn" and ao != "off"):
                        continue
                    if method == "llmc_fp16" and not fmt.startswith("int"):
                        continue  # fp16 scales are the INT formats' (MX scales are E8M0)
                    if loaded is None:
                        loaded = member(name, args.nsamples, args.max_tokens)
                    model, tok, (ids, alt), stream, ev, info = loaded
                    row = {**info, "format": fmt, "actorder": ao, "method": method}
                    m = copy.deepcopy(model)
                    t0 = time.perf_counter()
                    try:
                        actorder = ao == "static"
                        if method in ("ours", "ours_default"):
                            run_ours(m, ids, fmt, actorder, matched=method == "ours")
                        elif method == "ours_alt":
                            if alt is None:
                                raise ValueError("calib.nsamples < 2 x --nsamples: no second draw")
                            run_ours(m, alt, fmt, actorder, matched=True)
                        elif method == "rtn":
                            run_rtn(m, ids, fmt, actorder)
                        else:
                            run_llmc(m, ids, fmt, actorder, tok, method == "llmc_fp16")
                    except Exception as err:  # one failing cell must not lose the others
                        traceback.print_exc()
                        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                    row["seconds"] = time.perf_counter() - t0
                    if "error" not in row:
                        row["nll"] = measure_perplexity(m, stream, ev).nll
                        row["dnll"] = row["nll"] - info["fp_nll"]
                        w = linear_weights(m)
                        saved = os.path.join(args.out, "weights", f"{name}_{fmt}_{ao}.pt")
                        if method == "ours":  # kept for a later run's llmc_fp16 comparison
                            os.makedirs(os.path.dirname(saved), exist_ok=True)
                            torch.save(w, saved)
                        elif method.startswith("llmc") and os.path.exists(saved):
                            row["equal_to_ours"] = agreement(w, torch.load(saved))
                    print(json.dumps(row), flush=True)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    rows.append(row)
    return rows


# ---- output -----------------------------------------------------------------------------------
def environment() -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:  # the CPU's model name where Linux says it
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo")
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": f"CPU ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
                     "threads per process)",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    for mod in ("llmcompressor", "compressed_tensors"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


def report(env: dict, rows: list[dict]) -> str:
    import statistics

    idx = {(r["member"], r["format"], r["actorder"], r["method"]): r for r in rows}

    def dnll(key):
        r = idx.get(key)
        return None if r is None or "dnll" not in r else r["dnll"]

    def num(x, spec=".4f"):
        return "" if x is None else format(x, spec)

    def pct(x):
        return "" if x is None else f"{100 * x:.1f}%"

    lines = [f"# GPTQ parity with llm-compressor ({env['device']}, {env['date']})", "",
             f"torch {env['torch']}, transformers {env['transformers']}, llm-compressor "
             f"{env['llmcompressor']}, compressed-tensors {env['compressed_tensors']}. "
             "dNLL (nats) of every column on the same evaluation tokens, calibrated on the same "
             "tokens (ours_alt: on the next draw). Columns: bench/bench_gptq_parity.py.", "",
             "| model | format | act-order | ours | llmc | llmc / ours | llmc weights = ours | "
             "llmc_fp16 | llmc_fp16 weights = ours | ours_alt / ours | ours_default | rtn |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    gaps, spreads = [], []
    for name, fmt, ao in dict.fromkeys((r["member"], r["format"], r["actorder"]) for r in rows):
        ours, llmc, f16, alt = (dnll((name, fmt, ao, m)) for m in
                                ("ours", "llmc", "llmc_fp16", "ours_alt"))
        ratio = None if ours is None or llmc is None else llmc / ours
        spread = None if ours is None or alt is None else alt / ours
        if ratio is not None:
            gaps.append(ratio)
        if spread is not None:
            spreads.append(spread)
        same, same16 = (pct(idx.get((name, fmt, ao, m), {}).get("equal_to_ours"))
                        for m in ("llmc", "llmc_fp16"))
        lines.append(
            f"| {name} | {fmt} | {ao} | {num(ours)} | {num(llmc)} | {num(ratio, '.3f')} | "
            f"{same} | {num(f16)} | {same16} | {num(spread, '.3f')} | "
            f"{num(dnll((name, fmt, ao, 'ours_default')))} | {num(dnll((name, fmt, 'off', 'rtn')))} |")
    errors = sorted({(r["member"], r["format"], r["method"], r["error"]) for r in rows
                     if "error" in r})
    if errors:
        lines += ["", "Cells without a number:", ""] + [f"- {n} {f} {m}: {e}" for n, f, m, e
                                                        in errors]

    def dev(xs):  # median |log ratio| as a percentage
        return 100 * (math.exp(statistics.median(abs(math.log(x)) for x in xs)) - 1)

    if gaps:
        lines += ["", f"llmc / ours over {len(gaps)} cells: geometric mean "
                  f"{statistics.geometric_mean(gaps):.3f} (min {min(gaps):.3f}, max "
                  f"{max(gaps):.3f}); ours has the lower dNLL in {sum(g > 1 for g in gaps)}; "
                  f"median |difference| {dev(gaps):.1f}%."]
    if spreads:
        lines.append(f"ours_alt / ours (another calibration draw) over {len(spreads)} cells: "
                     f"geometric mean {statistics.geometric_mean(spreads):.3f}, median "
                     f"|difference| {dev(spreads):.1f}%.")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gptq_parity.jsonl")
    old = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
    done = {(r["member"], r["format"], r["actorder"], r["method"]) for r in old}
    rows = old + ([] if args.report_only else cells(args, done))
    env = environment()
    with open(os.path.join(args.out, "gptq_parity.json"), "w") as f:
        json.dump({"environment": env, "args": vars(args), "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "gptq_parity.md"), "w") as f:
        f.write(report(env, rows))
    print(report(env, rows))


if __name__ == "__main__":
    main()
