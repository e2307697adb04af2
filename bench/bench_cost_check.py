"""The cost model's estimate (runner/cost.py) against two measured jobs of a Xu-study kind (issue 20).

Usage (on the GPU machine; ``--dry-run``: tiny shapes on the CPU, a plumbing check)::

    PYTHONPATH=$PWD/src python3 bench/bench_cost_check.py --out $OUT

Two jobs of the Xu et al. grid's kind (a Pythia member, an MX format, RTN or GPTQ, WikiText-2
style perplexity, landscape features) on randomly initialised gpt_neox models of the public
members' config shapes (no download: the machine has no hub): pythia-410m with RTN into
mxint4_b32, pythia-1.4b with GPTQ into mxfp4 on 128 x 2048 calibration tokens. Each runs the
GPU stages of a job in one piece, as ``ptqscale-run`` does: the full-precision perplexity pass
(262,144 tokens, 2048-token windows, batch 8), the landscape's noise response and Hessian
(2,048 tokens in 512-token windows, 3 levels, 2 probes, 3 power iterations), the method, the
quantized perplexity pass. Seconds and peak GPU memory of each stage are set beside the
estimate of the committed ``assets/cost_model.json`` for the same job (the member's published
size, as ``ptqscale-plan`` uses it, and the built model's exact count). Writes
``cost_check_h200.json`` and ``cost_check_h200.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from bench_streaming import GIB, measure, release  # noqa: E402  (sets the allocator first)

# Pythia's published configs (EleutherAI/pythia-*/config.json): gpt_neox, rotary 25%,
# parallel residual, untied head, vocab 50304, context 2048.
PYTHIA = {
    "410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096),
    "1.4b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=8192),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
}
JOBS = [("410m", "rtn", "mxint4_b32"), ("1.4b", "gptq", "mxfp4")]


def build(size: str, dev: torch.device):
    import transformers as T

    config = T.GPTNeoXConfig(**PYTHIA[size], vocab_size=50304, rotary_pct=0.25,
                             use_parallel_residual=True, tie_word_embeddings=False,
                             max_position_embeddings=2048)
    torch.manual_seed(0)
    with dev:
        model = T.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def run_job(size: str, method_name: str, fmt: str, args, dev: torch.device) -> dict:
    from ptqscale.methods import GPTQConfig, QuantContext, RTNConfig, quantize
    from ptqscale.metrics import EvalConfig, measure_perplexity
    from ptqscale.metrics.landscape import LandscapeConfig, measure_hessian, measure_noise_response
    from ptqscale.models import get_anatomy

    model = build(size, dev)
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 50304, (args.tokens,), generator=gen)
    calib = torch.randint(0, 50304, (args.nsamples, args.seqlen), generator=gen)
    ev = EvalConfig(seqlen=args.seqlen, batch_size=8, max_tokens=args.tokens)
    land = LandscapeConfig(enabled=True, levels_db=[40.0, 30.0, 20.0], seeds=1, antithetic=True,
                           max_tokens=args.landscape_tokens, batch_size=8, hutchinson_probes=2,
                           power_iters=3, power_tol=0.0, hvp_windows=1, hvp_retain_graph=False)
    windows = stream[: args.landscape_tokens].view(-1, args.landscape_seqlen)
    targets = dict(get_anatomy(model).targets)
    if method_name == "rtn":
        method, ctx = RTNConfig(format=fmt), QuantContext()
    else:
        method = GPTQConfig(format=fmt, device=str(dev), mx_aware=True)   # as xu2024
        ctx = QuantContext(calibration=calib, calibration_hash="synthetic")
    stages = [("fp_eval", lambda: {"nll": measure_perplexity(model, stream, ev).nll}),
              ("noise", lambda: {"kappa": measure_noise_response(model, targets, windows, land)["kappa"]}),
              ("hessian", lambda: {"trace": measure_hessian(model, targets, windows, land)["hessian_trace"]}),
              (method_name, lambda: {"sqnr_db": quantize(model, method, ctx).weight_sqnr_db}),
              ("eval", lambda: {"nll": measure_perplexity(model, stream, ev).nll})]
    measured = {}
    for name, fn in stages:
        measured[name] = measure(fn)
        print(json.dumps({"job": size, "stage": name, **measured[name]}, default=str), flush=True)
    model.to("cpu")   # off the GPU before the next job
    release()
    estimates = {label: estimate(size_text, method_name, ev, land, args)
                 for label, size_text in (("published", size), ("exact", f"{n / 1e6:.6f}m"))}
    return {"job": f"pythia-{size} {fmt} {method_name}", "params": n, "measured": measured,
            "measured_seconds": sum(m["seconds"] for m in measured.values()),
            "measured_peak_gib": max((m.get("peak_gib") or 0) for m in measured.values()),
            "estimate": estimates}


def estimate(size: str, method_name: str, ev, land, args) -> dict:
    """ptqscale-plan's estimate of the job (every stage paid, placement one)."""
    from ptqscale.runner import cost

    spec = SimpleNamespace(
        model=SimpleNamespace(size=size, max_gpu_memory=None, dtype="bfloat16", placement="one"),
        eval=ev, method=SimpleNamespace(name=method_name), landscape=land,
        data=SimpleNamespace(name="synthetic", path=None),   # eval.max_tokens tokens
        calib=SimpleNamespace(nsamples=args.nsamples, seqlen=args.seqlen))
    est = cost.estimate_job(cost.load_cost_model(), spec)
    per = {("fp_eval" if s.model_level and s.stage == "eval" else s.stage):
           {"seconds": s.seconds, "peak_gib": s.peak_gib} for s in est.stages}
    return {"stages": per, "reason": est.reason, "placement": est.placement,
            "seconds": sum(s.seconds for s in est.stages), "peak_gib": est.peak_gib}


def table(result: dict) -> str:
    lines = [f"# Cost model vs measured jobs ({result['device']}, {result['date']})", "",
             f"torch {result['torch']}, transformers {result['transformers']}; cost model fitted "
             f"on {', '.join(result['cost_model']['devices'])} data of "
             f"{result['cost_model']['dates'][0]}..{result['cost_model']['dates'][1]}. "
             "Estimate from the published size (as ptqscale-plan) / the exact count.", "",
             "| job | stage | measured s | estimated s | est / meas | measured peak GiB | "
             "estimated peak GiB |", "|---|---|---:|---:|---:|---:|---:|"]
    for job in result["jobs"]:
        est = job["estimate"]["published"]["stages"]
        exact = job["estimate"]["exact"]["stages"]
        for stage, m in job["measured"].items():
            e, x = est.get(stage, {}), exact.get(stage, {})
            ratio = (f"{e['seconds'] / m['seconds']:.2f}" if e and m.get("status") == "ok" else "-")
            lines.append(f"| {job['job']} | {stage} | {m['seconds']:.2f} | "
                         f"{e.get('seconds', float('nan')):.2f} / {x.get('seconds', float('nan')):.2f}"
                         f" | {ratio} | {m.get('peak_gib') or 0:.2f} | "
                         f"{e.get('peak_gib') or float('nan'):.2f} |")
        pub = job["estimate"]["published"]
        lines.append(f"| {job['job']} | **job** | {job['measured_seconds']:.2f} | "
                     f"{pub['seconds']:.2f} | {pub['seconds'] / job['measured_seconds']:.2f} | "
                     f"{job['measured_peak_gib']:.2f} | {pub['peak_gib'] or float('nan'):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for cost_check_h200.{json,md}")
    p.add_argument("--dry-run", action="store_true", help="tiny shape, few tokens, CPU")
    args = p.parse_args(argv)
    args.tokens, args.seqlen, args.nsamples = 262144, 2048, 128
    args.landscape_tokens, args.landscape_seqlen = 2048, 512
    jobs = JOBS
    if args.dry_run:
        args.tokens, args.seqlen, args.nsamples = 4096, 256, 4
        args.landscape_tokens, args.landscape_seqlen = 512, 256
        jobs = [("tiny", "rtn", "mxint4_b32"), ("tiny", "gptq", "mxfp4")]
    import transformers

    from ptqscale.runner import cost

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    model = cost.load_cost_model()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "gpu_total_gib": (torch.cuda.get_device_properties(dev).total_memory / GIB
                                if dev.type == "cuda" else None),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "cost_model": {k: model[k] for k in ("devices", "dates", "gpu")},
              "jobs": [run_job(*job, args, dev) for job in jobs]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost_check_h200.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "cost_check_h200.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
