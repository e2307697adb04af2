"""A sweep on a real (one-node) SLURM cluster through the submitit launcher.

Each test launches ``ptqscale-run --multirun ... hydra/launcher=slurm`` exactly as a user
would, on the cluster of the ``slurm`` fixture: one array task per grid point. Then it
interrupts one task the way a cluster does (``scancel``; a preemption signal) and checks
that the store ends with exactly one complete record per grid point, none run twice.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptqscale.store import iter_records

pytestmark = pytest.mark.slow

STUDY = "scaleout"
# Small budgets keep a stories260k job at a few seconds (as in tests/runner).
FAST = ["eval.max_tokens=2048", "eval.seqlen=256", "progress=false"]
# The grid in full on the command line, so that edits of a study cannot change this test.
GRID = [f"study={STUDY}", "model=stories260k", "data=tinystories", "method=rtn",
        "wandb.mode=disabled"]
FORMATS = ["int8", "mxfp4", "nvfp4"]
# One CPU and 1 GB per task so that two tasks share this machine's cores.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=ci", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]


def launch(formats: list[str], results: Path, cluster, *, wait: bool = True):
    """``ptqscale-run --multirun`` of the grid on ``formats`` through SLURM.

    Returns the finished process (``.stdout`` holds its output), or the running Popen.
    """
    cmd = [sys.executable, "-m", "ptqscale.runner.app", "--multirun", *GRID,
           f"format={','.join(formats)}", *FAST, *SLURM,
           f"paths.results={results}", "hydra.job_logging.root.level=INFO"]
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)


def records(results: Path) -> dict[str, dict]:
    """format name -> record of every job of the study."""
    recs = list(iter_records(results, STUDY))
    by_format = {r["format"]["name"]: r for r in recs}
    assert len(by_format) == len(recs), "two records for one grid point"
    return by_format


def sweep_dirs(results: Path) -> list[Path]:
    """The multirun folders of the study, oldest first (one per launch)."""
    return sorted((results / "_hydra" / STUDY / "multirun").iterdir())


def wait_for_started_task(cluster, results: Path, proc, timeout: float = 180,
                          skip: tuple[str, ...] = (), in_job: bool = True) -> tuple[str, int]:
    """A task SLURM says is RUNNING and, with ``in_job``, whose Hydra folder is set up.

    Hydra writes ``<sweep>/<n>/.hydra/config.yaml`` after submitit installed its signal
    handlers and just before the job itself starts; the job then needs seconds to finish.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        running = [j for j, s in cluster.queue().items()
                   if s == "RUNNING" and "_" in j and j not in skip]
        base = results / "_hydra" / STUDY / "multirun"
        for job in sorted(running):
            task = int(job.split("_")[1])
            if not in_job or list(base.glob(f"*/{task}/.hydra/config.yaml")):
                return job, task
        time.sleep(0.1)
    raise AssertionError(f"no task started within {timeout}s: {cluster.queue()}\n{cluster.logs()}")


def wait_for_empty_queue(cluster, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while cluster.queue():
        assert time.monotonic() < deadline, f"queue not drained: {cluster.queue()}"
        time.sleep(0.5)


def job_logs(sweep: Path) -> str:
    """Everything the tasks of one launch logged (submitit's per-task stdout/stderr)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*_log.*")))


def completed_in(logs: str, tag: str = "[complete] ") -> list[str]:
    """The formats of the jobs that ran to a complete record in these logs (``tag``
    "[skip] ": that found their record complete and skipped)."""
    names = [line.split(tag)[1].split()[0] for line in logs.splitlines() if tag in line]
    return sorted(name.split("/")[-2] for name in names)   # {study}/.../{format}/{method}


def cancel_a_running_task(slurm, results: Path, attempts: int = 3) -> tuple[str, int, str]:
    """Launch the grid and scancel one task while it runs: (job id, task, launcher output).

    scancel lands as soon as SLURM says RUNNING: the task is still starting its interpreter
    (~2 s) and then needs ~5 s for the job, while submitit ignores the SIGTERM and the
    SIGKILL follows ~1.5 s later (KillWait=0 in slurm_cluster). Cancelling only once the
    job had begun raced on fast machines. Should a task still finish, the sweep succeeds
    and the scenario is set up again in a clean results folder.
    """
    for _ in range(attempts):
        proc = launch(FORMATS, results, slurm, wait=False)
        victim, task = wait_for_started_task(slurm, results, proc, in_job=False)
        assert slurm.run(["scancel", victim]).returncode == 0
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            return victim, task, out
        wait_for_empty_queue(slurm)
        shutil.rmtree(results)
        results.mkdir()
    raise AssertionError(f"the multirun never reported a cancelled job ({attempts} tries)")


def test_sweep_runs_on_slurm_and_a_relaunch_runs_only_the_cancelled_job(slurm, tmp_path):
    _, task, out = cancel_a_running_task(slurm, tmp_path)
    assert "CANCELLED" in out, out[-3000:]
    wait_for_empty_queue(slurm)   # the other tasks of the array run to their end

    first = records(tmp_path)
    cancelled = FORMATS[task]
    assert cancelled not in first, f"{cancelled} finished before scancel reached it"
    assert sorted(first) == sorted(set(FORMATS) - {cancelled})
    assert all(r["status"] == "complete" for r in first.values())
    rdir = tmp_path / STUDY / "records"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in rdir.glob("*.json")}

    again = launch(FORMATS, tmp_path, slurm)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    final = records(tmp_path)
    assert sorted(final) == sorted(FORMATS)
    assert all(r["status"] == "complete" for r in final.values())
    # the finished jobs were skipped: their records are byte-for-byte the same files
    assert {n: (p.stat().st_mtime_ns, p.read_bytes()) for n, p in
            ((n, rdir / n) for n in before)} == before
    assert len(list(rdir.glob("*.json"))) == len(FORMATS)
    logs = job_logs(sweep_dirs(tmp_path)[-1])
    assert logs.count("[skip]") == len(FORMATS) - 1, logs[-3000:]
    assert completed_in(logs) == [cancelled]


def test_timed_out_and_preempted_tasks_are_requeued_and_resume(slurm, tmp_path):
    """One task gets SLURM's time-limit warning, the other is requeued by the cluster.

    With timeout_min=10, submitit counts any USR2 as a time-out (it guarantees a job
    min(80%, limit - 10 min) of its time), so it requeues the task while the configured
    max_num_timeout allows it. ``scontrol requeue`` is what a cluster with
    PreemptMode=REQUEUE does to a preempted job.
    """
    formats = FORMATS[:2]
    proc = launch(formats, tmp_path, slurm, wait=False)
    timed_out, _ = wait_for_started_task(slurm, tmp_path, proc)
    assert slurm.run(["scancel", "--signal=USR2", timed_out]).returncode == 0
    preempted, _ = wait_for_started_task(slurm, tmp_path, proc, skip=(timed_out,))
    assert slurm.run(["scontrol", "requeue", preempted]).returncode == 0
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    # On a loaded machine the requeue can land just after the task finished: SLURM then runs
    # it again (it finds its record and skips) after submitit has collected the results.
    wait_for_empty_queue(slurm)
    final = records(tmp_path)
    assert sorted(final) == sorted(formats)
    assert all(r["status"] == "complete" for r in final.values())
    logs = job_logs(sweep_dirs(tmp_path)[-1])
    assert "this job is timed-out" in logs, logs[-3000:]
    assert f"Requeued job {timed_out} (1 remaining timeouts)" in logs, logs[-3000:]
    # both tasks started twice; each grid point ran to a record once, never twice. A task
    # whose requeue landed after it finished ran again and skipped: that run's log replaced
    # the one with its "[complete]" line (same job and task id), so it shows as a skip
    assert logs.count("Starting with JobEnvironment") == 4, logs[-3000:]
    done = completed_in(logs)
    assert len(done) == len(set(done)) and done, logs[-3000:]
    assert sorted(set(done) | set(completed_in(logs, "[skip] "))) == sorted(formats), logs[-3000:]
    # the sbatch script runs the launcher's own interpreter (the venv's) with our defaults
    script = next(sweep_dirs(tmp_path)[-1].glob(".submitit/*/*_submission.sh")).read_text()
    assert f"{sys.executable} -u -m submitit.core._submit" in script
    for flag in ("--cpus-per-task=1", "--partition=ci", "--time=10", "--mem=1GB",
                 f"--job-name=ptqscale-{STUDY}", f"--array=0-{len(formats) - 1}%{len(formats)}"):
        assert f"#SBATCH {flag}\n" in script, (flag, script)

