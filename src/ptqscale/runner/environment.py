"""Library versions, git SHA and device of a job, for its record."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import re
import socket
import subprocess
from pathlib import Path

import torch


@functools.cache
def ptqscale_version() -> str:
    """The installed distribution's version, else (a source checkout on PYTHONPATH) the one
    pyproject.toml declares."""
    try:
        return importlib.metadata.version("ptqscale")
    except importlib.metadata.PackageNotFoundError:
        text = (Path(__file__).resolve().parents[3] / "pyproject.toml").read_text()
        return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


@functools.cache
def git_sha() -> str | None:
    """The checkout's HEAD (with ``+dirty`` when the tree has changes), or None outside git."""
    repo = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def environment(model: torch.nn.Module | None = None) -> dict:
    import transformers

    from ptqscale.models import placement_of
    from ptqscale.models.mapped import weights_of

    # where the model computes: a streamed model's weights wait on the CPU
    placement = placement_of(model) if model is not None else None
    device = placement.device if placement is not None else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    env = {"ptqscale": ptqscale_version(), "torch": torch.__version__,
           "transformers": transformers.__version__,
           "python": platform.python_version(), "git_sha": git_sha(),
           "device": str(device), "device_name": name or platform.machine(),
           # what model.placement (auto too) decided: speed and memory only
           "placement": _placement_name(placement),
           # mapped from the checkpoint's safetensors as loaded, or copied (models/mapped.py)
           "weights": weights_of(model) if model is not None else None,
           "hostname": socket.gethostname()}
    if placement is not None and placement.spread:  # which blocks went to which device
        from ptqscale.models.spread import describe

        env["device_map"] = describe(placement.device_map)
    return env


def _placement_name(placement) -> str:
    if placement is None:
        return "one"
    return "spread" if placement.spread else "streamed" if placement.streamed else "one"
