"""What task accuracy (metric ``tasks``) and KL (metric ``fidelity``) add to a job at ~1B.

    python bench/bench_tasks.py --out DIR            # CUDA: Llama-3.2-1B's shape, bf16
    python bench/bench_tasks.py --out DIR --smoke    # tiny model on CPU (fp32), 20 items

Model: a random-weight Llama with Llama-3.2-1B's shape (timing only; vocab 128256, where the
vocabulary dominates the fidelity metric's cost). Tokenizer: the reference family's (vocab
8192, ids valid in the larger vocabulary); Llama 3's own tokenizer would cut the texts into
roughly a quarter fewer tokens, so the task rows are an upper bound for it.
Rows, synchronised, after one warm-up of each step:

- ``nll``: the job's NLL pass over ``--eval-tokens`` tokens of random ids (gptq preset,
  seqlen 2048, batch 8), the reference cost: what a job measures anyway;
- ``tasks <name>``: ``run_tasks`` (lm-eval's ``simple_evaluate`` on the in-memory model, as
  the metric runs it) on each offline task we ship, every item, batch ``--batch-size``; and
  ``tasks (all three)``, one call on all three, as a study asking for them would run;
- ``fidelity fp reference``: the fp model's top-k reference over the metric's budget (once
  per model, then cached); ``fidelity per job, shared``: what the metric adds to the NLL pass
  that hands it its logits (the job's case); ``own pass``: its fallback (a pass of its own).

Columns: seconds, the same over the NLL pass, the items lm-eval scored (each costs one
loglikelihood request per choice). Writes DIR/bench_tasks.md and DIR/bench_tasks.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers as T

from ptqscale.assets import ZOO_CHECKPOINTS
from ptqscale.metrics import EvalConfig, measure_perplexity
from ptqscale.metrics import fidelity as F
from ptqscale.metrics.tasks import TasksConfig, run_tasks

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
             tie_word_embeddings=True)
SMOKE = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=8192)
TASKS = ("ptq_gutenberg_cloze", "ptq_gutenberg_continuation", "ptq_tinystories_cloze")


def timed(device, fn):
    """Seconds of fn() after one warm-up call (synchronised on CUDA), and its result."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch-size", type=int, default=64, help="lm-eval batch size")
    ap.add_argument("--eval-tokens", type=int, default=65536, help="the job's NLL budget")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    seqlen = 128 if args.smoke else 2048
    limit = 20 if args.smoke else None
    eval_tokens = 8 * seqlen if args.smoke else args.eval_tokens
    fid_tokens = 8 * seqlen if args.smoke else F.MAX_TOKENS
    shape = SMOKE if args.smoke else SHAPE

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**shape, max_position_embeddings=seqlen,
                                             attn_implementation="sdpa"))
    model = model.to(device=device, dtype=dtype).eval()
    tok = T.AutoTokenizer.from_pretrained(ZOO_CHECKPOINTS / "gutenberg-llama-200k")
    cfg = EvalConfig(preset="gptq", seqlen=seqlen, batch_size=8)
    stream = torch.randint(0, shape["vocab_size"], (max(eval_tokens, fid_tokens),))

    rows = []
    nll_s, _ = timed(device, lambda: measure_perplexity(model, stream[:eval_tokens], cfg))
    rows.append({"step": f"nll ({eval_tokens} tokens)", "seconds": nll_s, "items": 0})
    for names in [[t] for t in TASKS] + [list(TASKS)]:
        tcfg = TasksConfig(names=names, limit=limit, batch_size=args.batch_size)
        s, res = timed(device, lambda: run_tasks(model, tok, tcfg))   # noqa: B023
        items = sum(len(v) for v in (res.get("samples") or {}).values())
        label = names[0] if len(names) == 1 else f"all {len(names)}"
        rows.append({"step": f"tasks {label}", "seconds": s, "items": items})
    ref_s, ref = timed(device, lambda: F.fp_reference(model, stream, cfg, fid_tokens))
    rows.append({"step": f"fidelity fp reference ({fid_tokens} tokens, once per model)",
                 "seconds": ref_s, "items": 0})
    cmp_s, out = timed(device, lambda: F.compare(model, stream, cfg, ref, fid_tokens))
    assert out["kl_max"] == 0.0 and out["flip_rate"] == 0.0   # the model against itself
    rows.append({"step": "fidelity per job, own pass (fallback)", "seconds": cmp_s, "items": 0})

    def shared():   # the NLL pass hands the metric its logits: its excess over the pass
        tap = F.SharedPass(ref, F.fidelity_windows(stream.numel(), cfg, fid_tokens), cfg.seqlen)
        measure_perplexity(model, stream[:eval_tokens], cfg, on_logits=tap)
        return F.compare(model, stream, cfg, ref, fid_tokens, shared=tap)
    both_s, both = timed(device, shared)
    assert both == out
    rows.append({"step": "fidelity per job, shared NLL pass", "seconds": both_s - nll_s,
                 "items": 0})
    for r in rows:
        r["over_nll"] = r["seconds"] / nll_s

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": T.__version__, "dtype": str(dtype),
            "shape": "smoke" if args.smoke else "llama-3.2-1b", "seqlen": seqlen,
            "lm_eval_batch_size": args.batch_size, "items_per_task": limit or "all (300)"}
    (out_dir / "bench_tasks.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                         indent=1))
    lines = [f"# tasks and fidelity cost ({meta['device']}, {meta['shape']}, {meta['dtype']})",
             "", "| step | seconds | x NLL pass | items |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['seconds']:.3g} | {r['over_nll']:.3g} | "
              f"{r['items'] or ''} |" for r in rows]
    (out_dir / "bench_tasks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
