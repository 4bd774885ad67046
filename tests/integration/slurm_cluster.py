"""A real SLURM on loopback for the launcher tests: MariaDB → slurmdbd → slurmctld → two slurmd.

The two nodes `n1` and `n2` are two slurmd daemons on this machine (`slurmd -N n1`, one port each),
so multi-node jobs, srun, job arrays, dependencies, signals and requeue all go through the real
daemons. Accounting is on because submitit (and `python -m launch status`) read job states with
`sacct`, which needs slurmdbd, which needs a MariaDB. There is no systemd and no munge: every daemon
runs in the foreground as a child of the test process with `auth/none`, and all state, logs and
the database live in one temporary directory that is removed with it.

`slurm_cluster` is the session fixture (import `slurm_cluster_fixture` to use it). The packages are
installed with apt-get when missing (CI runs as root on a fresh Debian); where that cannot be done,
the tests skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurmdbd", "slurm-client", "mariadb-server")
BINARIES = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "mariadbd", "mariadb-install-db")
NODES = ("n1", "n2")
CLUSTER = "dstrain-test"
HOSTS_LINE = "127.0.0.1 " + " ".join(NODES) + "  # added by the dstrain SLURM tests\n"


def install_packages() -> str | None:
    """Install the Debian packages if a binary is missing; return why that is impossible, or None."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"SLURM is not installed and cannot be (needs root and apt-get): apt-get install {' '.join(PACKAGES)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if result.returncode:
            return f"{' '.join(cmd)} failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}"
    missing = [b for b in BINARIES if not shutil.which(b)]
    return f"installed {' '.join(PACKAGES)} but {missing} are still missing" if missing else None


def free_ports(count: int) -> int:
    """The first of `count` consecutive free TCP ports on loopback (slurmd ports must be a range)."""
    for base in range(17000, 30000, 16):
        try:
            sockets = []
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free range of TCP ports on loopback")


class SlurmCluster:
    """The daemons, their config files under `root`, and helpers to run SLURM commands against them."""

    def __init__(self, root: Path, cpus_per_node: int = 1) -> None:
        self.root = root
        self.cpus_per_node = cpus_per_node
        self.conf = root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[tuple[str, subprocess.Popen]] = []
        self._added_hosts = False

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self._add_hosts()
        base = free_ports(3 + len(NODES))
        self.ports = {"mysql": base, "dbd": base + 1, "ctld": base + 2, "node": base + 3}
        for folder in ("etc", "state", "log", "mysql", "run", *(f"spool/{n}" for n in NODES)):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._write_configs()
        self._start_mariadb()
        self._spawn("slurmdbd", ["slurmdbd", "-D"])  # reads slurmdbd.conf next to $SLURM_CONF
        self._wait(lambda: self._port_open(self.ports["dbd"]), "slurmdbd to listen", "slurmdbd.log")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld to answer", "slurmctld.log")
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._nodes_idle, "both nodes to be idle", "slurmd-n1.log")

    def stop(self) -> None:
        if self._daemons:  # jobs first: a job step (slurmstepd) would outlive its slurmd
            self.run("scancel", "--user", str(os.getuid()), check=False)
            deadline = time.monotonic() + 60
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._daemons.clear()
        if self._added_hosts:
            hosts = Path("/etc/hosts")
            hosts.write_text(hosts.read_text().replace(HOSTS_LINE, ""))

    # ------------------------------------------------------------------ client commands

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def state(self, job_id: str) -> str:
        """The job's state in accounting (the latest attempt of a requeued job), '' before it is recorded."""
        out = self.run("sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id, check=False).stdout.split()
        return out[0] if out else ""

    def wait_for(self, job_id: str, timeout: float = 300) -> str:
        """Poll until the job has ended (for a requeued job: its last attempt); return its final state."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "DEADLINE", "BOOT_FAIL"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in final:
                return state
            time.sleep(0.5)
        queue = self.run("squeue", check=False).stdout
        raise TimeoutError(f"job {job_id} still {self.state(job_id)!r} after {timeout:.0f} s\n{queue}")

    # ------------------------------------------------------------------ internals

    def _add_hosts(self) -> None:
        """The node names must resolve: MASTER_ADDR is the first node of the allocation."""
        hosts = Path("/etc/hosts")
        if not all(_resolves(n) for n in NODES):
            with hosts.open("a") as f:
                f.write(HOSTS_LINE)
            self._added_hosts = True

    def _write_configs(self) -> None:
        r, p, n = self.root, self.ports, len(NODES)
        node_resources = f"CPUs={self.cpus_per_node} RealMemory=4000 State=UNKNOWN"
        self.conf.write_text(f"""\
ClusterName={CLUSTER}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={p["ctld"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
AuthAltTypes=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=300
EnforcePartLimits=ALL
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={p["dbd"]}
NodeName=n[1-{n}] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{p["node"]}-{p["node"] + n - 1}] {node_resources}
PartitionName=debug Nodes=n[1-{n}] Default=YES MaxTime=INFINITE State=UP
""")
        dbd = r / "etc" / "slurmdbd.conf"
        dbd.write_text(f"""\
AuthType=auth/none
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={p["dbd"]}
SlurmUser=root
PidFile={r}/run/slurmdbd.pid
LogFile={r}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={p["mysql"]}
StorageUser=root
StorageLoc=slurm_acct_db
""")
        dbd.chmod(0o600)  # slurmdbd refuses a config that others can read

    def _start_mariadb(self) -> None:
        data = self.root / "mysql"
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root", "--skip-test-db",
                        "--auth-root-authentication-method=normal"], check=True, capture_output=True)
        run = self.root / "run"
        self._spawn("mariadb", ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root", "--skip-grant-tables",
                                "--bind-address=127.0.0.1", f"--port={self.ports['mysql']}", f"--socket={run}/mysql.sock",
                                f"--pid-file={run}/mysql.pid", f"--log-error={self.root}/log/mariadb.log"])
        self._wait(lambda: self._port_open(self.ports["mysql"]), "MariaDB to listen", "mariadb.log")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = (self.root / "log" / f"{name}.console").open("w")
        self._daemons.append((name, subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)))

    def _wait(self, ready, what: str, log: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for name, proc in self._daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}: {self._tail(name)}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}: {self._tail(log.removesuffix('.log'))}")

    def _tail(self, name: str) -> str:
        logs = [self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.console"]
        return "\n".join(p.read_text()[-2000:] for p in logs if p.exists())

    def _port_open(self, port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return out.count("idle") == len(NODES)


def _resolves(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        return False


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory) -> Iterator[SlurmCluster]:
    """Two-node SLURM with accounting for the whole session; torn down at its end."""
    reason = install_packages()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
