"""The cost of a whole study against the same jobs run one by one from cold (issue 23).

    python bench/bench_study_cost.py --out DIR                  # a 1B model (needs the hub)
    python bench/bench_study_cost.py --out DIR --model gutenberg-llama-1m --max-tokens 65536
    python bench/bench_study_cost.py --out DIR --data wikitext2 \
        --random-llama /tmp/rl1b --tokenizer .carry/gpt2      # no hub: a random 1.1B Llama

A grid of formats x methods (default: family_scan's 13 formats x {rtn, gptq}) on one model
and corpus is run twice, each into a fresh results folder, timed end to end from process
launch to exit:

- cold: every job alone, ``ptqscale-run <one point>`` in its own process with its own
  empty results and cache folders (model load, token streams, the full-precision
  evaluation and the GPTQ Hessians all paid by every job);
- study: one ``ptqscale-run --multirun`` of the whole grid into one results folder, as a
  user launches a study (one worker: model loaded once and given back between jobs, token
  streams, the full-precision reference and, with ``fp_inputs``, Hessians shared).

Both must produce the same numbers: the script checks every job's NLL is bitwise equal
between the two before it reports the ratio study / sum(cold). Writes DIR/study_cost.md and
DIR/study_cost.json (device, date, versions, every job's seconds).

``--random-llama DIR`` builds (once) a seeded random bf16 Llama of TinyLlama-1.1B's shape with
GPT-2's tokenizer (``--tokenizer``: a folder with ``encoder.json`` and ``vocab.bpe``) in DIR
and runs the grid on it as a local model: random weights change no cost, and the GPU machine
has no hub. The cold jobs' seconds are written to the JSON as they finish.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ptqscale.store import iter_records

STUDY = "study_cost_bench"
FORMATS = ("bf16,int8,int4_g128,int3_g128,fp8_e4m3,mxfp8_e4m3,mxfp6_e2m3,mxfp4,mxint8,"
           "mxint4_b32,mxint3_b128,nvfp4,nf4")


RANDOM_SHAPES = {  # TinyLlama-1.1B's shape (bench_perplexity's), GPT-2's vocabulary padded to 64
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4),
    "smoke": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4),
    "deep": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=22,
                 num_attention_heads=8, num_key_value_heads=4),  # the 1.1B's depth, on a CPU
}


def random_llama(folder: Path, tokenizer: Path, shape: str) -> None:
    """A seeded random bf16 Llama with GPT-2's tokenizer, saved as a local model folder."""
    if (folder / "config.json").exists():
        return
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(str(tokenizer / "encoder.json"), str(tokenizer / "vocab.bpe"))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(**RANDOM_SHAPES[shape], vocab_size=50304, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         torch_dtype="bfloat16")
    model = LlamaForCausalLM(config)
    # Random logits score worse than a uniform guess, which the runner refuses as implausible.
    # A Zipf prior over GPT-2's ids (roughly in frequency order) beats it at any depth: the
    # embeddings carry a constant 16 in dimension 0 of the residual stream, no block writes
    # there (row 0 of every o_proj and down_proj is zero: at 22 random layers the blocks'
    # writes are larger than any constant and flip its sign, session 13 on an H100), the
    # final norm keeps only that dimension, and the head maps it to log(1 / (id + 10)),
    # tilted by h_0 / sqrt(hidden) in (0, 1]. Every matmul keeps its shape, so the cost is a
    # 1.1B's.
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 16.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight[:, 0] = (-torch.log(torch.arange(config.vocab_size) + 10.0)
                                      / config.hidden_size ** 0.5)
    model = model.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def model_args(args: argparse.Namespace) -> list[str]:
    if args.random_llama is None:
        return [f"model={args.model}"]
    # a local member's config (revision null: Hydra's multirun cannot take a null override)
    return ["model=gutenberg-llama-1m", f"model.path={args.random_llama.resolve()}",
            f"model.name=random-llama-{args.random_size}", "model.family=random-llama",
            f"model.size={args.random_size}", "model.max_seqlen=2048", "model.dtype=bfloat16"]


def common(args: argparse.Namespace, results: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "ptqscale.runner.app", *flags, f"study={STUDY}",
            *model_args(args), f"data={args.data}", f"eval.max_tokens={args.max_tokens}",
            "wandb.mode=disabled", "progress=false", f"paths.results={results}", *args.override]


def timed(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}; see {log}")
    return seconds


def nll_by_point(results: Path) -> dict[tuple[str, str], float]:
    return {(r["method"]["name"], r["format"]["name"]): r["metrics"]["nll"]
            for r in iter_records(results, STUDY) if r.get("status") == "complete"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--data", default="gutenberg")
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--max-tokens", type=int, default=262144)
    ap.add_argument("--work", type=Path, default=Path("/tmp/study_cost"))
    ap.add_argument("--random-llama", type=Path, help="build and use a random Llama here")
    ap.add_argument("--random-size", choices=tuple(RANDOM_SHAPES), default="1.1b")
    ap.add_argument("--tokenizer", type=Path, help="GPT-2 tokenizer files for --random-llama")
    ap.add_argument("--resume", type=Path, help="go on from this study_cost.json")
    ap.add_argument("override", nargs="*", help="more Hydra overrides for every job")
    args = ap.parse_args()
    if args.random_llama is not None:
        if args.tokenizer is None:
            ap.error("--random-llama needs --tokenizer (a folder with encoder.json, vocab.bpe)")
        random_llama(args.random_llama, args.tokenizer, args.random_size)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "logs").mkdir(parents=True)
    points = [(m, f) for m in args.methods.split(",") for f in args.formats.split(",")]
    # --resume: a run cut short (a GPU call's time limit) goes on from its own JSON; the
    # study and the cold jobs it finished are not run again
    state = json.loads(args.resume.read_text()) if args.resume else {"cold": []}
    if state.get("meta", {}).get("points", [list(p) for p in points]) != [list(p) for p in points]:
        sys.exit(f"--resume {args.resume} is another grid")
    state["meta"] = meta(args, points, state.get("meta"))
    if "study_s" not in state:
        study = args.work / "study"
        state["study_s"] = round(timed([*common(args, study, "--multirun"),
                                        f"method={args.methods}", f"format={args.formats}"],
                                       args.work / "logs" / "study.log"), 2)
        state["study_nll"] = [[m, f, x] for (m, f), x in nll_by_point(study).items()]
        write(args, state)
    done = {(c["method"], c["format"]) for c in state["cold"]}
    for i, (method, fmt) in enumerate(points):
        if (method, fmt) in done:
            continue
        results = args.work / "cold" / str(i)
        s = timed([*common(args, results), f"method={method}", f"format={fmt}"],
                  args.work / "logs" / f"cold-{i}.log")
        nll = nll_by_point(results).get((method, fmt))
        state["cold"].append({"method": method, "format": fmt, "s": round(s, 2), "nll": nll})
        shutil.rmtree(results)  # a cold job's caches are its own; free the disk as we go
        write(args, state)
    study_nll = {(m, f): x for m, f, x in state["study_nll"]}
    cold_nll = {(c["method"], c["format"]): c["nll"] for c in state["cold"]}
    missing = [p for p in points if study_nll.get(p) is None or cold_nll.get(p) is None]
    if missing:
        sys.exit(f"jobs without a result: {missing}")
    state["nll_differ"] = [p for p in points if study_nll[p] != cold_nll[p]]
    state["cold_sum_s"] = round(sum(c["s"] for c in state["cold"]), 2)
    state["ratio"] = round(state["study_s"] / state["cold_sum_s"], 3)
    write(args, state)
    print((args.out / "study_cost.md").read_text())
    if state["nll_differ"]:
        sys.exit(f"NLL differs between study and cold jobs: {state['nll_differ']}")


def meta(args: argparse.Namespace, points: list, before: dict | None) -> dict:
    now = {"device": torch.cuda.get_device_name() if torch.cuda.is_available()
           else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(),
           "model": args.model, "random_llama": args.random_llama and args.random_size,
           "data": args.data, "max_tokens": args.max_tokens, "override": args.override,
           "jobs": len(points), "points": [list(p) for p in points]}
    if before:  # a resumed run: both runs' device and date stay on the record
        now["runs"] = [*before.get("runs", [{k: before[k] for k in ("device", "date")}]),
                       {k: now[k] for k in ("device", "date")}]
    return now


def write(args: argparse.Namespace, state: dict) -> None:
    """The JSON (as it stands) and the table, rewritten after every step."""
    (args.out / "study_cost.json").write_text(json.dumps(state, indent=1) + "\n")
    m, cold = state["meta"], state["cold"]
    model = f"random Llama {m['random_llama']} (seeded, bf16)" if m["random_llama"] else \
        f"`{m['model']}`"
    runs = "; runs: " + ", ".join(f"{r['device']} {r['date']}" for r in m["runs"]) \
        if "runs" in m else ""
    cold_s = sum(c["s"] for c in cold)
    lines = [f"# A study against its jobs run one by one from cold ({m['device']})", "",
             f"{m['date']}; torch {m['torch']}; model {model}, data `{m['data']}`, "
             f"{m['max_tokens']} evaluation tokens, {m['jobs']} jobs "
             f"({args.methods} x {len(args.formats.split(','))} formats); overrides: "
             f"{' '.join(m['override']) or 'none'}{runs}.", "",
             "| run | wall s |", "|---|---:|",
             f"| study (one multirun) | {state['study_s']:.1f} |",
             f"| cold: sum of {len(cold)} of {m['jobs']} single-job processes | {cold_s:.1f} |"]
    if "ratio" in state:
        differ = state["nll_differ"]
        lines += [f"| **ratio** | **{state['ratio']:.3f}** |", "",
                  f"NLL equal between the two for {m['jobs'] - len(differ)} of {m['jobs']} "
                  "jobs" + (f"; differ: {differ}" if differ else ".")]
    else:
        lines += ["", f"Incomplete: {m['jobs'] - len(cold)} cold jobs still to run "
                  "(`--resume` this JSON)."]
    lines += ["", "| method | format | cold job s |", "|---|---|---:|",
              *(f"| {c['method']} | {c['format']} | {c['s']:.1f} |" for c in cold)]
    (args.out / "study_cost.md").write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
