"""One job per GPU on one host: the same sweep of equal jobs with 1 and with 2 local workers.

    python bench/bench_multigpu.py --out DIR            # a 2-GPU host: 8 GPTQ jobs
    python bench/bench_multigpu.py --out DIR --method blockft --format int3_g32
    python bench/bench_multigpu.py --out DIR --smoke    # CPU: 2 tiny RTN jobs (plumbing only)

Each run is ``ptqscale-run --multirun ... hydra/launcher=local_gpus hydra.launcher.n_jobs=W``
into a fresh results folder (nothing is skipped), timed from launch to exit. The jobs are
equal: one model, method and format, one seed each (the seed only picks the calibration
samples). While the 2-worker sweep runs, ``nvidia-smi`` is sampled to record which GPUs
held a job process at the same time; each job pins itself to its GPU through
CUDA_VISIBLE_DEVICES (ptqscale.runner.gpus.claim_gpu). Writes DIR/multigpu.md and
DIR/multigpu.json (devices, date, torch version, every number).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from ptqscale.store import iter_records

STUDY = "multigpu_bench"


def grid(args: argparse.Namespace) -> list[str]:
    if args.smoke:
        return ["model=stories260k", "data=tinystories", "method=rtn", "format=int4_g128",
                "seed=range(0,2)", "eval.max_tokens=2048", "eval.seqlen=256"]
    return [f"model={args.model}", "data=gutenberg", f"method={args.method}", f"format={args.format}",
            f"seed=range(0,{args.jobs})", f"eval.max_tokens={args.max_tokens}"]


def run_sweep(args: argparse.Namespace, workers: int, results: Path) -> dict:
    """One timed multirun; the GPUs seen busy together, from nvidia-smi samples."""
    shutil.rmtree(results, ignore_errors=True)
    cmd = [sys.executable, "-m", "ptqscale.runner.app", "--multirun", f"study={STUDY}",
           *grid(args), "hydra/launcher=local_gpus", f"hydra.launcher.n_jobs={workers}",
           "wandb.mode=disabled", "progress=false", f"paths.results={results}",
           "~hydra.callbacks.study_summary"]   # no end-of-sweep summary inside the timing
    sampler = GpuSampler()
    sampler.start()
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    sampler.stop()
    records = list(iter_records(results, STUDY))
    complete = sum(r["status"] == "complete" for r in records)
    if out.returncode != 0 or complete != len(records) or not records:
        raise SystemExit(f"sweep with {workers} workers failed ({complete}/{len(records)} "
                         f"complete):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    job_seconds = [r["timings"]["total"] for r in records]
    return {"workers": workers, "jobs": len(records), "wall_s": round(seconds, 2),
            "mean_job_s": round(sum(job_seconds) / len(job_seconds), 2),
            "max_gpus_busy_at_once": sampler.max_busy,
            "devices_in_records": sorted({r["env"].get("device_name", "?") for r in records})}


class GpuSampler:
    """Polls nvidia-smi for GPUs running a compute process (max at one instant)."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.max_busy = every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        if shutil.which("nvidia-smi"):
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        cmd = ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid", "--format=csv,noheader"]
        while not self._stop.wait(self.every):
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
            busy = {line.split(",")[0].strip() for line in out.splitlines() if line.strip()}
            self.max_busy = max(self.max_busy, len(busy))


def devices() -> list[str]:
    n = torch.cuda.device_count()
    return [torch.cuda.get_device_name(i) for i in range(n)] or [platform.processor() or "cpu"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--model", default="gutenberg-llama-1m")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--method", default="gptq",
                        help="blockft (single block) makes jobs long against a worker's start-up")
    parser.add_argument("--format", default="int4_g128")
    parser.add_argument("--max-tokens", type=int, default=1 << 20)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [run_sweep(args, w, args.out / f"results_{w}") for w in (1, 2)]
    speedup = runs[0]["wall_s"] / runs[1]["wall_s"]
    info = {"devices": devices(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "grid": grid(args), "smoke": args.smoke}
    rows = [f"| {r['workers']} | {r['jobs']} | {r['wall_s']:.1f} | {r['mean_job_s']:.1f} | "
            f"{r['max_gpus_busy_at_once']} |" for r in runs]
    text = "\n".join([
        f"# One job per GPU: 1 vs 2 local workers ({'smoke, CPU' if args.smoke else 'GPU'})",
        "", f"Devices: {', '.join(info['devices'])}; torch {info['torch']}; {info['date']}.",
        f"Sweep: `{' '.join(info['grid'])}` with `hydra/launcher=local_gpus`.",
        f"Speed-up of 2 workers over 1: **{speedup:.2f}x**.", "",
        "| workers | jobs | wall s | mean job s | GPUs busy at once (nvidia-smi) |",
        "|---:|---:|---:|---:|---:|", *rows, ""])
    (args.out / "multigpu.md").write_text(text)
    (args.out / "multigpu.json").write_text(json.dumps({**info, "runs": runs,
                                                        "speedup": speedup}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
