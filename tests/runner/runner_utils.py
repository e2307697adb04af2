"""Helpers for runner tests (a module of its own: test files import it by name)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Small budgets keep a stories260k job at a few seconds on 2 CPU cores.
FAST = ["eval.max_tokens=2048", "eval.seqlen=256", "progress=false"]
# The quickstart sweep crosses three models; runner tests need one grid axis at a time.
ONE_MODEL = "model=gutenberg-llama-200k"


def run_cli(args: list[str], results: Path, *, timeout: int = 300, env: dict | None = None,
            wait: bool = True):
    """Run ``ptqscale-run`` in a subprocess with results under ``results``."""
    cmd = [sys.executable, "-m", "ptqscale.runner.app", *args, f"paths.results={results}",
           "hydra.job_logging.root.level=INFO"]
    full_env = {**os.environ, "WANDB_SILENT": "true", "WANDB_API_KEY": "", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
