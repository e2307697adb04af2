"""A throwaway one-node SLURM cluster on localhost, for the scale-out tests.

``SlurmCluster(folder).start()`` writes a munge key and a ``slurm.conf`` into ``folder``
and starts munged, slurmctld and slurmd in the foreground (so that their pids are ours),
all on free ports and private sockets: nothing touches /etc or a system-wide daemon.
``stop()`` cancels what is left in the queue and stops every daemon by its pid.
Clients (sbatch, squeue, sacct, submitit) find the cluster through ``cluster.env``
(``SLURM_CONF``).

Job accounting (``sacct``, which submitit polls for job states) is slurmdbd with a
private MariaDB server, both also started from ``folder``: without accounting a
cancelled job never reports a final state and submitit would wait for it forever.

Example::

    cluster = SlurmCluster(Path(tempfile.mkdtemp()))
    cluster.start()
    try:
        subprocess.run(["sinfo"], env=cluster.env)
    finally:
        cluster.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "slurmdbd", "mariadbd")
PACKAGES = ("slurm-wlm", "slurmdbd", "munge", "mariadb-server")
PARTITION = "ci"


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the cluster (the reason is the message): tests skip."""


def ensure_installed(timeout: int = 900) -> None:
    """Install Debian's SLURM, munge and MariaDB with apt-get when a daemon is missing."""
    missing = [d for d in DAEMONS if _which(d) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"{', '.join(missing)} not installed and not root to install")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"{', '.join(missing)} not installed and no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        out = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode != 0:
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {out.stderr[-500:]}")
    still = [d for d in DAEMONS if _which(d) is None]
    if still:
        raise ClusterUnavailable(f"installed {PACKAGES} but {still} still not found")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
