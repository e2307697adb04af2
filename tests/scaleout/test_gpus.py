"""GPU claims of the local one-job-per-GPU launcher, on a simulated 2-GPU host.

No GPU here: torch's device queries are replaced by a fake host whose device count
follows CUDA_VISIBLE_DEVICES as NVML does. The locks, the pinning and the fallback are
the real code. (The measured speed-up on two real GPUs: bench/bench_multigpu.py.)
"""

from __future__ import annotations

import fcntl
import os

import pytest

from ptqscale.runner import gpus


class FakeHost:
    """``n`` GPUs; ``initialised`` says whether CUDA was set up before the claim."""

    def __init__(self, monkeypatch, n: int = 2, initialised: bool = False) -> None:
        self.n, self.initialised, self.set_device_calls = n, initialised, []
        self.runtime_env: str | None = None     # CUDA_VISIBLE_DEVICES when CUDA initialised
        cuda = gpus.torch.cuda
        monkeypatch.setattr(cuda, "device_count", self.visible)
        monkeypatch.setattr(cuda, "is_initialized", lambda: self.initialised)
        monkeypatch.setattr(cuda, "init", self.init)
        monkeypatch.setattr(cuda, "set_device", self.set_device_calls.append)
        monkeypatch.setattr(gpus, "_runtime_device_count", self.runtime_count)
        monkeypatch.setattr(gpus, "_pinned", None)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def visible(self) -> int:
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        return self.n if env is None else len([d for d in env.split(",") if d])

    def init(self) -> None:
        if not self.initialised:
            self.initialised, self.runtime_env = True, os.environ.get("CUDA_VISIBLE_DEVICES")

    def runtime_count(self) -> int:
        env = self.runtime_env
        return self.n if env is None else len([d for d in env.split(",") if d])

    def new_process(self, monkeypatch, env: str | None = None) -> None:
        """Forget this process's pin and CUDA state, as a fresh worker would."""
        self.initialised, self.runtime_env = False, None
        monkeypatch.setattr(gpus, "_pinned", None)
        if env is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)


def locked(path) -> bool:
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def test_a_cpu_machine_claims_nothing(monkeypatch, tmp_path):
    FakeHost(monkeypatch, n=0)
    with gpus.claim_gpu(str(tmp_path)) as index:
        assert index is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and gpus.gpu_count() == 0


def test_concurrent_workers_pin_distinct_gpus_and_keep_them(monkeypatch, tmp_path):
    host = FakeHost(monkeypatch)
    assert gpus.gpu_count() == 2
    with gpus.claim_gpu(str(tmp_path)) as first:
        assert first == 0 and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        assert locked(tmp_path / "gpu-0.lock") and not locked(tmp_path / "gpu-1.lock")
        host.new_process(monkeypatch)        # a second worker while the first job runs
        with gpus.claim_gpu(str(tmp_path)) as second:
            assert second == 0 and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
            assert locked(tmp_path / "gpu-1.lock")
    assert not locked(tmp_path / "gpu-0.lock") and not locked(tmp_path / "gpu-1.lock")
    # the second worker's next job: the same GPU (CUDA cannot be re-pinned), locked again
    with gpus.claim_gpu(str(tmp_path)) as again:
        assert again == 0 and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        assert locked(tmp_path / "gpu-1.lock") and not locked(tmp_path / "gpu-0.lock")
    assert host.set_device_calls == []


def test_a_slurm_gpu_is_locked_by_its_physical_id(monkeypatch, tmp_path):
    host = FakeHost(monkeypatch, n=4)
    host.new_process(monkeypatch, env="3")    # SLURM gave this job GPU 3
    with gpus.claim_gpu(str(tmp_path)) as index:
        assert index == 0 and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
        assert locked(tmp_path / "gpu-3.lock") and not (tmp_path / "gpu-0.lock").exists()


@pytest.mark.parametrize("torch_initialised", [True, False])
def test_cuda_initialised_before_the_claim_falls_back_to_set_device(monkeypatch, tmp_path,
                                                                     torch_initialised):
    host = FakeHost(monkeypatch)
    # either torch created its context already, or something initialised the CUDA driver
    # behind torch's back (torch.cuda.is_available()): the runtime still sees both GPUs
    host.initialised = torch_initialised
    monkeypatch.setattr(gpus, "_runtime_device_count", lambda: 2)
    with gpus.claim_gpu(str(tmp_path)) as first, gpus.claim_gpu(str(tmp_path)) as second:
        assert (first, second) == (0, 1)
        assert locked(tmp_path / "gpu-0.lock") and locked(tmp_path / "gpu-1.lock")
    assert host.set_device_calls == [0, 1]
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and gpus._pinned is None
