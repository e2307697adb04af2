"""A throwaway one-node SLURM cluster on localhost, for the scale-out tests.

``SlurmCluster(folder).start()`` writes a munge key and a ``slurm.conf`` into ``folder``
and starts munged, slurmctld and slurmd in the foreground (so that their pids are ours),
all on free ports and private sockets: nothing touches /etc or a system-wide daemon.
``stop()`` cancels what is left in the queue and stops every daemon by its pid.
Clients (sbatch, squeue, sacct, submitit) find the cluster through ``cluster.env``
(``SLURM_CONF``).

Job accounting (``sacct``, which submitit polls for the state of array tasks) is
slurmdbd with a private MariaDB server, both also started from ``folder``: without
accounting a cancelled task never reports a final state and submitit would wait for it
forever (a real cluster has accounting too).

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
        try:
            out = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ClusterUnavailable(f"`{' '.join(cmd)}` did not finish: {e}") from e
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


class SlurmCluster:
    """munged + MariaDB + slurmdbd + slurmctld + slurmd, all under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.folder / "slurm.conf")}
        self.ports = {name: free_port() for name in ("ctld", "slurmd", "dbd", "mysql")}

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        """Start every daemon and wait until the node is idle; ClusterUnavailable if not."""
        ensure_installed()
        try:
            self._write_configs()
            self._spawn("munged", [_which("munged"), "--foreground", "--force",
                                   f"--socket={self.munge_socket}",
                                   f"--key-file={self.folder / 'munge.key'}",
                                   f"--pid-file={self.folder / 'munged.pid'}",
                                   f"--seed-file={self.folder / 'munged.seed'}",
                                   f"--log-file={self.folder / 'munged.log'}"])
            self._wait(lambda: self.munge_socket.exists(), "munged socket", timeout)
            self._start_database(timeout)
            self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
            self._wait(lambda: self._ok(["sacctmgr", "-i", "add", "cluster", "ci"]),
                       "slurmdbd (sacctmgr add cluster)", timeout)
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost"])
            self._wait(lambda: self.node_state() == "idle", "node localhost idle", timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancel every job left in the queue, then stop the daemons by pid, newest first."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._ok(["scancel", f"--partition={PARTITION}"])
            self._wait(lambda: not self.queue(), "queue drained", 30, fail=False)
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()

    # -- clients -----------------------------------------------------------------------
    def queue(self) -> dict[str, str]:
        """Job id (``<array>_<task>``) -> state of every job slurmctld still lists."""
        out = self.run(["squeue", "-h", "-r", "-o", "%i %T"])
        return dict(line.split() for line in out.stdout.splitlines() if line.strip())

    def node_state(self) -> str:
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"])
        return out.stdout.strip() if out.returncode == 0 else ""

    def run(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def logs(self, tail: int = 2000) -> str:
        """The end of every daemon's log, for failure messages."""
        parts = []
        for log in sorted(self.folder.glob("*.log")) + sorted(self.folder.glob("*.out")):
            parts.append(f"== {log.name}\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- internals ---------------------------------------------------------------------
    @property
    def munge_socket(self) -> Path:
        return self.folder / "munge.sock"

    def _write_configs(self) -> None:
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for sub in ("state", "spool", "db"):
            (self.folder / sub).mkdir(exist_ok=True)
        (self.folder / "slurm.conf").write_text(self._slurm_conf())
        dbd = self.folder / "slurmdbd.conf"   # read from beside slurm.conf; must be 0600
        dbd.write_text(self._slurmdbd_conf())
        dbd.chmod(0o600)

    def _slurm_conf(self) -> str:
        f, p = self.folder, self.ports
        return "\n".join([
            "ClusterName=ci", "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={p['ctld']}", f"SlurmdPort={p['slurmd']}",
            # cred_expire also sets how long a requeued job waits before it may start
            # again (120 s by default); 5 s keeps the requeue test short.
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            "CredType=cred/munge", "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={f / 'state'}", f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}", f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'slurmctld.log'}", f"SlurmdLogFile={f / 'slurmd.log'}",
            # no cgroups in a container: track processes by parent pid, bind nothing
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "ReturnToService=2",
            # submitit ignores the SIGTERM of scancel and requeue; only the SIGKILL that
            # follows after KillWait (+2 s of srun's own wait) stops the task. A test job
            # needs ~5 s, so with the default the kill could land after it finished.
            "KillWait=0",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=localhost", f"AccountingStoragePort={p['dbd']}",
            # the munge socket used to talk to slurmdbd (not AuthInfo's)
            f"AccountingStoragePass={self.munge_socket}",
            f"NodeName=localhost NodeAddr=127.0.0.1 {self._hardware()} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])

    def _slurmdbd_conf(self) -> str:
        f, p = self.folder, self.ports
        return "\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            "DbdHost=localhost", "DbdAddr=127.0.0.1", f"DbdPort={p['dbd']}", "SlurmUser=root",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
            f"StoragePort={p['mysql']}", "StorageUser=root", "StorageLoc=slurm_acct_db",
            f"PidFile={f / 'slurmdbd.pid'}", f"LogFile={f / 'slurmdbd.log'}", ""])

    @staticmethod
    def _hardware() -> str:
        """CPUs, sockets, cores and memory as slurmd detects them (``slurmd -C``)."""
        out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True,
                             timeout=30).stdout.split()
        wanted = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore",
                  "RealMemory")
        fields = [w for w in out if w.split("=")[0] in wanted]
        if not any(w.startswith("CPUs=") for w in fields):
            raise ClusterUnavailable(f"`slurmd -C` did not report the CPUs: {out}")
        return " ".join(fields)

    def _start_database(self, timeout: float) -> None:
        db = self.folder / "db"
        init = subprocess.run(
            [_which("mariadb-install-db"), "--no-defaults", f"--datadir={db}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if init.returncode != 0:
            raise ClusterUnavailable(f"mariadb-install-db failed: {init.stderr[-500:]}")
        self._spawn("mariadbd", [_which("mariadbd"), "--no-defaults", f"--datadir={db}",
                                 "--user=root", "--bind-address=127.0.0.1",
                                 f"--port={self.ports['mysql']}",
                                 f"--socket={self.folder / 'mysql.sock'}",
                                 f"--pid-file={self.folder / 'mysql.pid'}",
                                 f"--log-error={self.folder / 'mysql.log'}"])
        self._wait(lambda: _port_open(self.ports["mysql"]), "MariaDB port", timeout)

    def _spawn(self, name: str, cmd: list[str | None]) -> None:
        out = open(self.folder / f"{name}.out", "w")   # noqa: SIM115 - lives with the daemon
        self.procs[name] = subprocess.Popen([str(c) for c in cmd], env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def _ok(self, cmd: list[str]) -> bool:
        return self.run(cmd).returncode == 0

    def _wait(self, ready, what: str, timeout: float, fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead and fail:
                raise ClusterUnavailable(f"{dead} exited while waiting for {what}:\n"
                                         f"{self.logs(800)}")
            if ready():
                return True
            time.sleep(0.3)
        if fail:
            raise ClusterUnavailable(f"timed out after {timeout}s waiting for {what}:\n"
                                     f"{self.logs(800)}")
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
