"""``factory train A B ... --jobs N``: one process per family, N at a time.

Members of a few hundred thousand parameters leave a GPU idle between kernel launches (the
step is bound by Python and launch latency, not FLOPs), so families trained side by side in
separate processes share one GPU well. Each child is the same command for one family with
``--jobs 1``; a stopped parent (e.g. by ``timeout``) stops its children, so a ``pack`` that
follows sees a folder nobody writes to any more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ptqscale import console
from ptqscale.zoo.family import FamilyConfig


def side_by_side(args, fams: list[FamilyConfig]) -> None:
    """Train ``fams`` as separate processes, ``args.jobs`` at a time; each logs to
    OUT/<family>.log, and any failed family fails the whole command at the end."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    pending, running, failed = list(fams), [], []
    Path(args.out).mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    try:
        _run_all(args, pending, running, failed, env)
    finally:  # a stopped parent (timeout) stops its families too, so pack sees a still folder
        for _, proc, log in running:
            proc.terminate()
            proc.wait()
            log.close()
    if failed:
        raise SystemExit(f"families failed: {failed} (see their .log under {args.out})")


def _run_all(args, pending, running, failed, env) -> None:
    while pending or running:
        while pending and len(running) < args.jobs:
            fam = pending.pop(0)
            cmd = [sys.executable, "-m", "ptqscale.zoo.factory", "train", fam.path,
                   "--data", args.data, "--out", args.out, "--device", args.device, "--jobs", "1"]
            cmd += ["--sizes", args.sizes] if args.sizes else []
            cmd += [] if args.deterministic else ["--no-deterministic"]
            log = open(Path(args.out) / f"{fam.family}.log", "w")
            running.append((fam, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                  env=env), log))
        time.sleep(1)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            console.say(f"[{item[0].family}] exit {item[1].returncode}")
            if item[1].returncode:
                failed.append(item[0].family)
