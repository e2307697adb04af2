"""What the ``fidelity`` metric adds to a job at ~1B, next to the NLL pass.

    python bench/bench_fidelity.py --out DIR            # CUDA: two ~1B Llama shapes, bf16
    python bench/bench_fidelity.py --out DIR --smoke    # tiny model on CPU (fp32)

Models: random-weight Llama configs (timing only): TinyLlama's shape (vocab 32000) and
Llama-3.2-1B's (vocab 128256, where the vocabulary dominates the metric's cost). Stream:
random token ids, gptq preset, seqlen 2048, batch 8, the metric's budget (16384 tokens).
Rows, median of ``--repeats`` after a warm-up, synchronised: the NLL pass over the same
tokens (``measure_perplexity``), the fp reference (once per model: ``fp_reference``), its
save and load (``torch.save``/``torch.load`` of the cache entry), and the per-job comparison
(``compare``: the metric's own forward pass plus the KL, its fallback), and the NLL pass
with the metric reading its logits (``on_logits``: what a job pays for both where the pass is
shared; ``shared_per_job_s`` is its excess over the NLL pass). Writes DIR/bench_fidelity.md,
.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import torch
import transformers as T

from ptqscale.metrics import EvalConfig, measure_perplexity
from ptqscale.metrics import fidelity as F

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True),
}
SMOKE = {"smoke": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, vocab_size=512)}


def timed(device, fn, repeats):
    """Median seconds of fn() over ``repeats`` runs after one warm-up; and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def measure(name, shape, device, dtype, cfg, budget, repeats) -> dict:
    """One row: the NLL pass, the fp reference, its cache entry, the per-job comparison."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**shape, max_position_embeddings=cfg.seqlen,
                                             attn_implementation="sdpa"))
    model = model.to(device=device, dtype=dtype).eval()
    stream = torch.randint(0, shape["vocab_size"], (budget,))
    nll_s, _ = timed(device, lambda: measure_perplexity(model, stream, cfg), repeats)
    ref_s, ref = timed(device, lambda: F.fp_reference(model, stream, cfg, budget), repeats)
    buf = io.BytesIO()
    save_s, _ = timed(device, lambda: (buf.seek(0), torch.save(ref, buf)), repeats)
    load_s, _ = timed(device, lambda: torch.load(io.BytesIO(buf.getvalue()), weights_only=True),
                      repeats)
    cmp_s, out = timed(device, lambda: F.compare(model, stream, cfg, ref, budget), repeats)
    assert out["kl_max"] == 0.0 and out["flip_rate"] == 0.0   # the model against itself

    def shared():   # what a job runs: the NLL pass hands its logits to the metric
        tap = F.SharedPass(ref, F.fidelity_windows(stream.numel(), cfg, budget), cfg.seqlen)
        measure_perplexity(model, stream, cfg, on_logits=tap)
        return F.compare(model, stream, cfg, ref, budget, shared=tap)
    passes = F.q_passes
    both_s, both = timed(device, shared, repeats)
    assert both == out and F.q_passes == passes   # the same numbers, no pass of its own
    return dict(model=name, vocab=shape["vocab_size"], tokens=out["fidelity_tokens"],
                top_k=out["fidelity_top_k"], nll_pass_s=nll_s, fp_reference_s=ref_s,
                cache_mb=len(buf.getvalue()) / 2**20, save_s=save_s, load_s=load_s,
                per_job_s=cmp_s, per_job_over_nll=cmp_s / nll_s, nll_with_fidelity_s=both_s,
                shared_per_job_s=both_s - nll_s, shared_over_nll=(both_s - nll_s) / nll_s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    seqlen = 128 if args.smoke else 2048
    budget = 8 * seqlen if args.smoke else F.MAX_TOKENS
    cfg = EvalConfig(preset="gptq", seqlen=seqlen, batch_size=8)
    rows = [measure(name, shape, device, dtype, cfg, budget, args.repeats)
            for name, shape in (SMOKE if args.smoke else SHAPES).items()]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "seqlen": seqlen,
            "repeats": args.repeats}
    (out_dir / "bench_fidelity.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                            indent=1))
    cols = list(rows[0])
    lines = [f"# fidelity cost ({meta['device']}, {meta['dtype']}, seqlen {seqlen})", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |" for r in rows]
    (out_dir / "bench_fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
