"""A real one-node SLURM cluster on this host, for the SLURM tests (and bench/slurm_overhead.py).

Registered for all test modules in tests/conftest.py (``slurm_cluster``, session-scoped). It starts,
each as a child process of this one, in the foreground, with everything under one temp dir:

    munged      --socket <dir>/munge/sock --key-file <new key>         (auth for all daemons)
    mariadbd    --datadir <new db> --port P --bind-address 127.0.0.1    (accounting storage)
    slurmdbd    -D   (slurmdbd.conf: StorageType=accounting_storage/mysql on that server)
    slurmctld   -D -i -f <dir>/etc/slurm.conf
    slurmd      -D -f <dir>/etc/slurm.conf   inside a private mount namespace (see below)

and at the end cancels the cluster's jobs and stops them in reverse order by PID (SIGTERM, SIGKILL
after a timeout), then ends any process left that carries the cluster's marker variable (job
processes and slurmstepd, which slurmd daemonises). Each daemon also gets PR_SET_PDEATHSIG, so
a test session that is killed outright takes its daemons with it.

Why slurmdbd and a database: the executor plugin (snakemake-executor-plugin-slurm) polls job
states with ``sacct``, and the tests check that every rule ran as a job with ``sacct``. With
``AccountingStorageType=accounting_storage/none`` SLURM 22.05's sacct only answers "Slurm
accounting storage is disabled" (tried here); the plugin's ``--slurm-status-command squeue``
would avoid the database but not sacct for the job records. slurmdbd's only storage back end
in 22.05 is MySQL/MariaDB, so a private mariadbd (its own data dir, 127.0.0.1 on a free port, a
user with a random password) is the least that gives a real sacct. Setting it up costs ~2 s.

Why slurmd runs in its own mount namespace: the job-side plugin
(snakemake-executor-plugin-slurm-jobstep 0.6.1) runs each rule with ``srun`` after removing every
``SLURM_*`` variable from the environment, ``SLURM_CONF`` included, so inside a job ``srun`` only
finds the compiled-in ``/etc/slurm/slurm.conf``. slurmd (and so every job it starts) sees the
generated config bind-mounted on ``/etc/slurm`` in a private namespace; the host's ``/etc/slurm``
is not touched. Client commands here (sbatch, sacct, snakemake) use ``SLURM_CONF``.

The cluster: ``NodeName=<hostname> CPUs=<cores> Gres=npu:8`` with ``GresTypes=npu`` count-only
(gres.conf ``Name=npu Count=8``, no device files), so the NPU profile's ``--gres=npu:N`` requests
can be checked; ``RealMemory`` models an Ascend node (``SlurmdParameters=config_overrides``:
slurmd does not drain the node for having less, nothing enforces memory); partitions ``cpu``
(default, for the cpu DAG) and the NPU profile's own partition name (``ascend``).

By hand: ``.venv/bin/python tests/slurm_cluster.py`` starts it, prints ``export SLURM_CONF=...``
and keeps it up until Ctrl-C.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ci_policy import unavailable
from daemons import pid_alive, stop_process

ROOT = Path(__file__).resolve().parents[1]
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin"
NODE_MEMORY_MB = 1_024_000  # modeled Ascend 910 x8 node (see the docstring), not this host's memory
NPU_PARTITION = "ascend"  # the partition name profiles/slurm/config.yaml asks for
CPU_PARTITION = "cpu"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
MARKER = "LLAMAPIPE_SLURM_TEST"  # in every daemon's (hence every job's) environment: the sweep's key
TOOLS = ("munged", "mungekey", "munge", "mariadb-install-db", "mariadbd", "mariadb", "slurmdbd",
         "slurmctld", "slurmd", "sbatch", "sacct", "sacctmgr", "scontrol", "sinfo", "squeue", "scancel",
         "srun", "unshare", "mount")
PACKAGES = "slurmctld slurmd slurm-client slurmdbd munge mariadb-server"


class ClusterError(RuntimeError):
    pass


@dataclass
class SlurmCluster:
    base: Path
    conf: Path  # slurm.conf: SLURM_CONF for client commands
    node: str
    cpus: int
    cpu_partition: str = CPU_PARTITION
    npu_partition: str = NPU_PARTITION
    procs: dict = field(default_factory=dict)  # name -> Popen, in start order
    versions: dict = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ for a client of this cluster (sbatch, sacct, snakemake --executor slurm)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), MARKER: str(self.base), **extra}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def log_tails(self, chars: int = 1500) -> str:
        out = []
        for path in sorted(self.base.glob("log/*.log")):
            out.append(f"--- {path.name}\n{_tail(path, chars)}")
        return "\n".join(out)


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def missing_tools() -> list[str]:
    return [t for t in TOOLS if not shutil.which(t, path=SBIN_PATH)]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this daemon when the process that started it (the test session) dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass




def _marked_pids(base: Path) -> list[int]:
    """Processes whose environment carries this cluster's marker (daemons' descendants, jobs)."""
    needle = f"{MARKER}={base}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _wait_for(what: str, probe, timeout: float, procs: dict, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with code {proc.returncode} while waiting for {what}; "
                                   f"log tail:\n{_tail(logs / f'{name}.log')}")
        try:
            ok, last = probe()
        except (OSError, subprocess.SubprocessError) as exc:
            ok, last = False, str(exc)
        if ok:
            return
        time.sleep(0.2)
    raise ClusterError(f"{what} not reached within {timeout:.0f} s ({last})")


def write_configs(base: Path, node: str, cpus: int, ports: dict, db_password: str) -> Path:
    etc = base / "etc"
    etc.mkdir()
    munge_sock = base / "munge" / "sock"
    slurm_conf = f"""\
# Generated by tests/slurm_cluster.py: one node, count-only npu gres, accounting via slurmdbd.
ClusterName=llamapipe
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports['slurmctld']}
SlurmdPort={ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_sock}
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# sacct (the plugin's status poll, the tests' job records) needs the accounting database.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports['slurmdbd']}
AccountingStoragePass={munge_sock}
AccountingStoreFlags=job_comment
AccountingStorageTRES=gres/npu
JobCompType=jobcomp/none
GresTypes=npu
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={NODE_MEMORY_MB} Gres=npu:8 State=UNKNOWN
PartitionName={CPU_PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName={NPU_PARTITION} Nodes={node} Default=NO MaxTime=INFINITE State=UP
"""
    (etc / "slurm.conf").write_text(slurm_conf)
    (etc / "gres.conf").write_text(f"NodeName={node} Name=npu Count=8\n")  # count only: no File=
    (etc / "cgroup.conf").write_text("CgroupPlugin=autodetect\n")  # unused: proctrack/linuxproc, task/none
    dbd = etc / "slurmdbd.conf"
    dbd.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={munge_sock}
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort={ports['slurmdbd']}
SlurmUser=root
PidFile={base}/run/slurmdbd.pid
LogFile={base}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mariadb']}
StorageUser=slurm
StoragePass={db_password}
StorageLoc=slurm_acct_db
""")
    dbd.chmod(0o600)  # slurmdbd refuses a readable config holding a password
    return etc / "slurm.conf"


def _version(tool: str) -> str:
    try:
        out = subprocess.run([shutil.which(tool, path=SBIN_PATH), "-V"], capture_output=True, text=True,
                             timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def start_cluster(base: Path) -> SlurmCluster:
    """Start munged, mariadbd, slurmdbd, slurmctld and slurmd under ``base``; raises
    ``ClusterError`` (after stopping what did start) with the reason and the logs' tails."""
    for sub in ("munge", "db", "state", "spool", "run", "log"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    names = ("mariadb", "slurmdbd", "slurmctld", "slurmd")
    ports = dict(zip(names, _free_ports(len(names))))
    password = secrets.token_hex(16)
    conf = write_configs(base, node, cpus, ports, password)
    cluster = SlurmCluster(base=base, conf=conf, node=node, cpus=cpus)
    cluster.versions = {"slurm": _version("slurmctld"), "munge": _version("munged")}
    logs = base / "log"
    daemon_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    daemon_env[MARKER] = str(base)

    def spawn(name: str, cmd: list[str], **env: str) -> None:
        with open(logs / f"{name}.log", "ab") as log:
            cluster.procs[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**daemon_env, **env},
                preexec_fn=_die_with_parent, cwd=base)

    def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, env=cluster.env(), **kw)

    try:
        munge_dir = base / "munge"
        munge_dir.chmod(0o755)
        subprocess.run(["mungekey", "--create", f"--keyfile={munge_dir / 'munge.key'}"], check=True,
                       capture_output=True)
        spawn("munged", ["munged", "--foreground", "--force", f"--socket={munge_dir / 'sock'}",
                         f"--key-file={munge_dir / 'munge.key'}", f"--pid-file={munge_dir / 'pid'}",
                         f"--seed-file={munge_dir / 'seed'}", f"--log-file={logs / 'munged.log'}"])

        def munge_ok():
            p = subprocess.run(f"munge -S {munge_dir / 'sock'} -n | unmunge -S {munge_dir / 'sock'}",
                               shell=True, capture_output=True, text=True, timeout=10)
            return p.returncode == 0, p.stderr.strip()

        _wait_for("munge", munge_ok, START_TIMEOUT, cluster.procs, logs)

        db, db_sock = base / "db", base / "run" / "mariadb.sock"
        p = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={db}", "--user=root",
                            "--auth-root-authentication-method=socket", "--skip-test-db"],
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed: {p.stdout[-1500:]}{p.stderr[-1500:]}")
        spawn("mariadb", ["mariadbd", "--no-defaults", f"--datadir={db}", f"--socket={db_sock}",
                          f"--port={ports['mariadb']}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                          "--user=root", f"--pid-file={base / 'run' / 'mariadb.pid'}",
                          "--innodb-buffer-pool-size=128M", "--innodb-lock-wait-timeout=900",
                          f"--log-error={logs / 'mariadb.log'}"])

        def db_ok():
            p = run("mariadb", "--no-defaults", f"--socket={db_sock}", "-u", "root", "-e", "select 1")
            return p.returncode == 0, p.stderr.strip()

        _wait_for("mariadb", db_ok, START_TIMEOUT, cluster.procs, logs)
        sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        p = run("mariadb", "--no-defaults", f"--socket={db_sock}", "-u", "root", "-e", sql)
        if p.returncode != 0:
            raise ClusterError(f"creating the slurm database user failed: {p.stderr}")

        spawn("slurmdbd", ["slurmdbd", "-D"], SLURM_CONF=str(conf))  # slurmdbd.conf: beside SLURM_CONF

        def dbd_ok():
            p = run("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster")
            return p.returncode == 0, p.stderr.strip()

        _wait_for("slurmdbd", dbd_ok, START_TIMEOUT, cluster.procs, logs)
        p = run("sacctmgr", "-i", "add", "cluster", "llamapipe")
        if p.returncode != 0 and "already exists" not in p.stdout + p.stderr:
            raise ClusterError(f"sacctmgr add cluster failed: {p.stdout}{p.stderr}")

        spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])

        def ctld_ok():
            p = run("scontrol", "ping")
            return p.returncode == 0 and "UP" in p.stdout, (p.stdout + p.stderr).strip()

        _wait_for("slurmctld", ctld_ok, START_TIMEOUT, cluster.procs, logs)

        # Jobs' srun reads /etc/slurm/slurm.conf (the jobstep plugin drops SLURM_CONF): show slurmd
        # and its jobs the generated one there, in a mount namespace of their own.
        spawn("slurmd", ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                         'mount --bind "$0" /etc/slurm && exec slurmd -D -f "$0/slurm.conf"', str(conf.parent)])

        def node_ok():
            p = run("sinfo", "-h", "-n", node, "-o", "%T")
            states = p.stdout.split()
            return p.returncode == 0 and bool(states) and all(s == "idle" for s in states), p.stdout.strip()

        _wait_for("node idle", node_ok, START_TIMEOUT, cluster.procs, logs)
        return cluster
    except BaseException as exc:
        tails = cluster.log_tails()
        stop_cluster(cluster)
        if isinstance(exc, ClusterError):
            raise ClusterError(f"{exc}\n{tails}") from None
        if isinstance(exc, (OSError, subprocess.SubprocessError)):
            raise ClusterError(f"{type(exc).__name__}: {exc}\n{tails}") from None
        raise


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel the cluster's jobs, stop the daemons by PID (reverse start order), end what is left."""
    if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
        try:
            cluster.run("scancel", "--user", "root", check=False, timeout=20)
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline:
                p = cluster.run("squeue", "-h", "-o", "%i", check=False, timeout=20)
                if p.returncode != 0 or not p.stdout.strip():
                    break
                time.sleep(0.5)
        except (OSError, subprocess.SubprocessError):
            pass
    for name in reversed(list(cluster.procs)):
        stop_process(cluster.procs[name], STOP_TIMEOUT)
    leftovers = _marked_pids(cluster.base)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while leftovers and time.monotonic() < deadline:
        leftovers = [p for p in leftovers if pid_alive(p)]
        time.sleep(0.1)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cluster_or_reason(base: Path) -> tuple[SlurmCluster | None, str]:
    missing = missing_tools()
    if missing:
        return None, (f"SLURM is not installed ({', '.join(missing)} missing): "
                      f"apt-get install -y {PACKAGES}  (make system-deps does it)")
    if os.geteuid() != 0:
        return None, "the SLURM test cluster runs its daemons as root (SlurmUser=root); not root"
    try:
        return start_cluster(base), ""
    except ClusterError as exc:
        return None, f"the SLURM test cluster did not come up: {exc}"


@pytest.fixture(scope="session")
def slurm_cluster():
    base = Path(tempfile.mkdtemp(prefix="lps", dir="/tmp"))  # short: unix socket paths
    cluster = None
    try:
        cluster, reason = cluster_or_reason(base)
        if cluster is None:
            unavailable(reason)
        print(f"[slurm cluster] {cluster.versions['slurm']}, node {cluster.node}, SLURM_CONF={cluster.conf}, "
              f"pids " + ", ".join(f"{k}={p.pid}" for k, p in cluster.procs.items()), flush=True)
        yield cluster
    finally:
        if cluster is not None:
            stop_cluster(cluster)
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    """By hand: start the cluster, print SLURM_CONF, stay up until Ctrl-C / SIGTERM."""
    base = Path(tempfile.mkdtemp(prefix="lps", dir="/tmp"))
    cluster, reason = cluster_or_reason(base)
    if cluster is None:
        print(reason)
        shutil.rmtree(base, ignore_errors=True)
        return 1
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        print(f"export SLURM_CONF={cluster.conf}   # {cluster.versions['slurm']}; logs in {base / 'log'}; "
              "up, Ctrl-C stops it", flush=True)
        while not stop:
            time.sleep(0.5)
    finally:
        stop_cluster(cluster)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
