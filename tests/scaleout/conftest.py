"""Fixtures for the scale-out tests: a one-node SLURM cluster (see slurm_cluster.py)."""

from __future__ import annotations

import pytest
from slurm_cluster import ClusterUnavailable, SlurmCluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running one-node cluster for the session; skipped where SLURM cannot run here.

    Installs Debian's slurm-wlm, slurmdbd, munge and MariaDB with apt-get when they are
    missing (needs root). Every daemon is stopped by pid at the end, even after a failure.
    """
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as e:
        pytest.skip(f"cannot run a SLURM cluster on this machine: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
