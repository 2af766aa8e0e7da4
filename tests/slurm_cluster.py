"""A real single-node Slurm cluster on loopback for the tests (Debian 12's Slurm 22.05).

munged, a private MariaDB, slurmdbd, slurmctld and slurmd all run from one work dir (keys, sockets,
state, spool, logs and pid files under it) on free ports picked at start, so nothing of the
machine's own set-up (/etc/slurm, /etc/munge, /run/munge, port 6817...) is read or touched.
`make slurm-deps` installs the Debian packages; without them `slurm_missing()` says why and the
fixture skips.

In a test (conftest.py makes the fixture available everywhere)::

    def test_x(slurm_cluster, tmp_path):
        subprocess.run(["sbatch", "--wrap", "true"], env=slurm_cluster.env, check=True)
        # os.environ["SLURM_CONF"] is set for the test's duration, so submitit (which runs
        # sbatch/sacct with os.environ) finds the cluster too.

The cluster is started once per session on first use and stopped at the end of the session;
after each test the fixture cancels whatever that test left queued or running.

Partitions on the one node (all MaxTime=INFINITE):
  debug  Default=YES, never preempted.
  low    PreemptMode=REQUEUE, GraceTime=30: its jobs are preempted by `high` jobs.
  high   PreemptMode=OFF, higher PriorityTier, OverSubscribe=EXCLUSIVE: a `high` job takes the
         whole node, so submitting one while a `low` job runs preempts that job (it gets its
         --signal, e.g. submitit's USR2, at once thanks to preempt_send_user_signal, then is
         requeued).
Jobs in debug and low share the node's CPUs (SelectTypeParameters=CR_CPU): with 2 CPUs two 1-CPU
jobs run at the same time.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

try:
    import pytest
except ImportError:  # usable outside pytest, e.g. from a script
    pytest = None

# Binaries that must be installed; daemons live in sbin, which a non-login PATH may lack.
REQUIRED = (
    "slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "sacctmgr", "squeue", "sinfo",
    "scancel", "scontrol", "munged", "mungekey", "mariadb-install-db",
)
EITHER = (("mariadbd", "mysqld"), ("mariadb", "mysql"))
DEB_PACKAGES = "slurmctld slurmd slurm-client slurmdbd munge mariadb-server mariadb-client"
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")

CLUSTER_NAME = "benchtest"
DB_NAME = "slurm_acct_db"
DB_USER = "slurm"
DB_PASS = "slurm-test-only"
# (name, pid file, SIGTERM wait in s) in the order stop() ends them.
STOP_ORDER = (
    ("slurmd", "slurmd.pid", 8),
    ("slurmctld", "slurmctld.pid", 8),
    ("slurmdbd", "slurmdbd.pid", 8),
    ("mariadbd", "mariadbd.pid", 10),
    ("munged", "munged.pid", 4),
)
STOP_BUDGET_S = 55.0
# A small InnoDB (the defaults make a 180 MB data dir, mostly redo log and undo space).
MARIADB_SMALL = ("--innodb-log-file-size=8M", "--innodb-data-file-path=ibdata1:4M:autoextend",
                 "--innodb-undo-tablespaces=0", "--innodb-autoextend-increment=4")


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return shutil.which(name, path=os.pathsep.join(path + [d for d in _SBIN if d not in path]))


def slurm_missing() -> str | None:
    """None when all the cluster needs is installed and we are root, else one line saying why not."""
    missing = [name for name in REQUIRED if not _which(name)]
    missing += [alts[0] for alts in EITHER if not any(_which(a) for a in alts)]
    if missing:
        return (f"Slurm not installed (missing {', '.join(missing)}): run `make slurm-deps` as root "
                f"(part of `make test`), i.e. apt-get install {DEB_PACKAGES}")
    if os.geteuid() != 0:
        return "the test Slurm cluster must run as root (SlurmUser=root, slurmd starts jobs)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"({path.name}: none)"
    return f"--- {path.name} ---\n" + "\n".join(text)


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    def __init__(self):
        self.workdir: Path | None = None
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.ports: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._started = False
        self.timings: dict[str, float] = {}

    # ---- paths and environment ------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.workdir / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.workdir / "munge" / "munge.socket"

    @property
    def db_socket(self) -> Path:
        return self.workdir / "mariadb" / "mariadb.sock"

    @property
    def logs(self) -> Path:
        return self.workdir / "log"

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF (and sbin on PATH): the env= for sbatch, squeue, sacct..."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        path = env.get("PATH", os.defpath).split(os.pathsep)
        env["PATH"] = os.pathsep.join(path + [d for d in _SBIN if d not in path])
        return env

    @contextlib.contextmanager
    def activated(self):
        """Set os.environ["SLURM_CONF"] (for submitit, which inherits os.environ) while inside."""
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        try:
            yield self
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old

    def run(self, *args: str, timeout: float = 20, check: bool = True
            ) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sbatch, squeue, sacct...) against this cluster."""
        argv = [_which(args[0]) or args[0], *args[1:]]
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} exited {proc.returncode}: "
                             f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    # ---- start ----------------------------------------------------------------------------
    def start(self, workdir: Path) -> "SlurmCluster":
        reason = slurm_missing()
        if reason:
            raise SlurmError(reason)
        if self._started:
            raise SlurmError("already started")
        self.workdir = Path(workdir).resolve()
        self._started = True
        _live.add(self)
        t0 = time.monotonic()
        try:
            self._write_files()
            self._step("munged", self._start_munged)
            self._step("mariadbd", self._start_mariadb)
            self._step("slurmdbd", self._start_slurmdbd)
            self._step("slurmctld", self._start_slurmctld)
            self._step("slurmd", self._start_slurmd)
        except BaseException as e:
            detail = "\n".join(_tail(p) for p in sorted(self.logs.glob("*")) if p.is_file())
            self.stop()
            if isinstance(e, Exception):
                raise SlurmError(f"starting the test Slurm cluster failed: {e}\n{detail}") from e
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def _step(self, name, fn):
        t = time.monotonic()
        fn()
        self.timings[name] = time.monotonic() - t

    def _write_files(self):
        w = self.workdir
        for sub in ("etc", "munge", "mariadb", "mariadb/tmp", "state", "spool", "log", "run"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(w, 0o755)
        os.chmod(w / "munge", 0o711)  # munged refuses a socket dir clients cannot traverse
        for sock in (self.munge_socket, self.db_socket):
            if len(str(sock)) > 100:
                raise SlurmError(f"work dir path too long for a unix socket: {sock}")
        (self.ports["mariadb"], self.ports["slurmdbd"], self.ports["slurmctld"],
         self.ports["slurmd"]) = _free_ports(4)

        mem_kb = int(next(line.split()[1] for line in open("/proc/meminfo")
                          if line.startswith("MemTotal:")))
        real_mem = max(mem_kb // 1024 - 512, 256)
        run, log = w / "run", w / "log"
        dbd = w / "etc" / "slurmdbd.conf"
        dbd.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost={self.node}
DbdAddr=127.0.0.1
DbdPort={self.ports['slurmdbd']}
SlurmUser=root
PidFile={run}/slurmdbd.pid
LogFile={log}/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports['mariadb']}
StorageUser={DB_USER}
StoragePass={DB_PASS}
StorageLoc={DB_NAME}
""")
        os.chmod(dbd, 0o600)  # slurmdbd refuses a readable conf (it holds the DB password)

        self.conf.write_text(f"""\
ClusterName={CLUSTER_NAME}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ports['slurmctld']}
SlurmdPort={self.ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool
SlurmctldPidFile={run}/slurmctld.pid
SlurmdPidFile={run}/slurmd.pid
SlurmctldLogFile={log}/slurmctld.log
SlurmdLogFile={log}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MinJobAge=3600
KillWait=5
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.ports['slurmdbd']}
AccountingStoragePass={self.munge_socket}
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={real_mem} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=low Nodes={self.node} MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes={self.node} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF OverSubscribe=EXCLUSIVE
""")

    def _spawn(self, name: str, argv: list[str]):
        out = open(self.logs / f"{name}.out", "ab")
        try:
            self._procs[name] = subprocess.Popen(
                argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True)
        finally:
            out.close()

    def _wait(self, what: str, ready, timeout: float, proc: str | None = None):
        deadline = time.monotonic() + timeout
        while True:
            if ready():
                return
            if proc and self._procs[proc].poll() is not None:
                raise SlurmError(f"{proc} exited with {self._procs[proc].returncode} ({what})")
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def _start_munged(self):
        m = self.workdir / "munge"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={m}/munge.key"],
                       check=True, capture_output=True, timeout=30)
        os.chmod(m / "munge.key", 0o600)
        self._spawn("munged", [
            _which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={m}/munge.key", f"--pid-file={self.workdir}/run/munged.pid",
            f"--log-file={self.logs}/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait("the munge socket", self.munge_socket.exists, 20, "munged")

    def _mariadb_client(self, sql: str, check=True):
        client = _which("mariadb") or _which("mysql")
        return subprocess.run(
            [client, "--no-defaults", f"--socket={self.db_socket}", "-uroot", "-e", sql],
            capture_output=True, text=True, timeout=20, check=check)

    def _start_mariadb(self):
        data = self.workdir / "mariadb" / "data"
        t = time.monotonic()
        install = subprocess.run(
            [_which("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
             "--auth-root-authentication-method=socket", "--skip-test-db",
             "--skip-name-resolve", *MARIADB_SMALL],
            capture_output=True, text=True, timeout=120)
        if install.returncode != 0:
            raise SlurmError("mariadb-install-db failed: "
                             f"{install.stdout[-2000:]}{install.stderr[-2000:]}")
        self.timings["mariadb-install-db"] = time.monotonic() - t
        self._spawn("mariadbd", [
            _which("mariadbd") or _which("mysqld"), "--no-defaults", f"--datadir={data}",
            "--user=root", "--bind-address=127.0.0.1", f"--port={self.ports['mariadb']}",
            f"--socket={self.db_socket}", f"--pid-file={self.workdir}/run/mariadbd.pid",
            f"--log-error={self.logs}/mariadbd.log", f"--tmpdir={self.workdir}/mariadb/tmp",
            "--skip-name-resolve", "--skip-log-bin", "--performance-schema=OFF",
            *MARIADB_SMALL, "--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0", "--innodb-lock-wait-timeout=900", "--max-connections=64"])
        self._wait("mariadbd", lambda: self.db_socket.exists()
                   and self._mariadb_client("SELECT 1", check=False).returncode == 0, 60, "mariadbd")
        users = [f"'{DB_USER}'@'{host}'" for host in ("127.0.0.1", "localhost")]
        self._mariadb_client(" ".join(
            f"CREATE USER {u} IDENTIFIED BY '{DB_PASS}'; "
            f"GRANT ALL PRIVILEGES ON {DB_NAME}.* TO {u};" for u in users))

    def _start_slurmdbd(self):
        # slurmdbd has no -f: it reads slurmdbd.conf beside $SLURM_CONF.
        self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        self._wait("slurmdbd's port", lambda: _port_open(self.ports["slurmdbd"]), 60, "slurmdbd")
        # Register the cluster before slurmctld connects (22.05's slurmctld would add it on its
        # first contact too; jobs are accounted without any account/user associations).
        self.run("sacctmgr", "-i", "add", "cluster", CLUSTER_NAME, timeout=30)

    def _start_slurmctld(self):
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: self.run("scontrol", "ping", check=False, timeout=10)
                   .stdout.find("is UP") >= 0, 30, "slurmctld")

    def _start_slurmd(self):
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])

        def idle():
            out = self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False).stdout
            return out.split() != [] and all(s.rstrip("*") == "idle" for s in out.split())
        self._wait(f"node {self.node} to be idle", idle, 30, "slurmd")
        self._wait("sacct", lambda: self.run("sacct", "-n", "-X", check=False).returncode == 0,
                   20)

    # ---- jobs -----------------------------------------------------------------------------
    def job_ids(self, states: str = "all") -> list[str]:
        out = self.run("squeue", "-h", "-t", states, "-o", "%i", check=False, timeout=10).stdout
        return out.split()

    def cancel_all(self, timeout: float = 15) -> bool:
        """scancel every job; wait until none is pending, running or completing. True when so."""
        deadline = time.monotonic() + timeout
        active = "PD,R,CG,CF,S,ST,RQ,RS,RH,RF,SE,SO,RD,RV,SI"
        ids = self.job_ids(active)
        killed = False
        while ids:
            self.run("scancel", *ids, check=False, timeout=10)
            if not killed and time.monotonic() > deadline - timeout / 2:
                # ignores SIGTERM (as submitit does) and KillWait is not over: kill it now
                self.run("scancel", "--full", "--signal=KILL", *ids, check=False, timeout=10)
                killed = True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.3)
            ids = self.job_ids(active)
        return True

    # ---- stop -----------------------------------------------------------------------------
    def stop(self):
        """Cancel all jobs, then end slurmd, slurmctld, slurmdbd, mariadbd and munged in that order.

        Ends whatever of them runs, after a failed start too; ~55 s at most, SIGKILL last."""
        if self.workdir is None or not self._started:
            return
        t0 = time.monotonic()
        deadline = t0 + STOP_BUDGET_S
        self._started = False
        _live.discard(self)
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                self.cancel_all(timeout=15)
            except (subprocess.SubprocessError, OSError):
                pass
            self._wait_steps_gone(min(5.0, deadline - time.monotonic() - 35))
        for name, pidfile, wait_s in STOP_ORDER:
            self._end(name, self.workdir / "run" / pidfile,
                      max(1.0, min(wait_s, deadline - time.monotonic() - 2)))
        for pid in self.leftover_pids():  # job steps of a step that would not end, say
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.timings["stop"] = time.monotonic() - t0

    def _end(self, name: str, pidfile: Path, wait_s: float):
        pids = set()
        proc = self._procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            pids.add(proc.pid)
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().split()[0])
            if pid > 1 and pid != os.getpid() and self._is_ours(pid):
                pids.add(pid)
        for sig, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 3.0)):
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            end = time.monotonic() + wait
            while time.monotonic() < end and any(_pid_alive(p) for p in pids):
                if proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(0.05)
                time.sleep(0.05)
            if not any(_pid_alive(p) for p in pids):
                break
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)

    def _is_ours(self, pid: int) -> bool:
        """A process started from this work dir, or with this cluster's SLURM_CONF."""
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return (str(self.workdir).encode() in cmd
                or f"SLURM_CONF={self.conf}".encode() in env.split(b"\0"))

    def leftover_pids(self) -> list[int]:
        """Processes of this cluster still alive (daemons, slurmstepd, job processes)."""
        if self.workdir is None:
            return []
        skip = {os.getpid()}
        with contextlib.suppress(OSError):
            pid = os.getpid()
            while pid > 1:  # never ourselves or an ancestor (they may carry SLURM_CONF)
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                skip.add(pid)
        return [int(p.name) for p in Path("/proc").iterdir()
                if p.name.isdigit() and int(p.name) not in skip
                and self._is_ours(int(p.name)) and _pid_alive(int(p.name))]

    def _wait_steps_gone(self, timeout: float):
        """Wait (briefly) for slurmstepd processes of this cluster to exit before slurmctld goes."""
        end = time.monotonic() + max(timeout, 0)
        while time.monotonic() < end:
            steps = [p for p in self.leftover_pids()
                     if Path(f"/proc/{p}/comm").exists()
                     and Path(f"/proc/{p}/comm").read_text().strip() == "slurmstepd"]
            if not steps:
                return
            time.sleep(0.1)


_live: set[SlurmCluster] = set()


@atexit.register
def _stop_live():
    for cluster in list(_live):
        cluster.stop()


# ---- pytest fixture ----------------------------------------------------------------------------
_session: dict = {}


def _session_cluster(config, tmp_path_factory) -> SlurmCluster:
    """One cluster per pytest session, started on first use, stopped when the session ends."""
    if "error" in _session:
        raise SlurmError(_session["error"])
    if "cluster" not in _session:
        cluster = SlurmCluster()

        def cleanup():
            cluster.stop()
            _session.clear()
        config.add_cleanup(cleanup)
        try:
            cluster.start(tmp_path_factory.mktemp("slurm", numbered=True))
        except SlurmError as e:
            _session["error"] = str(e)
            raise
        _session["cluster"] = cluster
    return _session["cluster"]


if pytest is not None:
    @pytest.fixture
    def slurm_cluster(request, tmp_path_factory):
        """A started SlurmCluster (session-wide), with os.environ["SLURM_CONF"] set for the test.

        Skips with slurm_missing()'s reason when Slurm is not installed; cancels the test's jobs
        afterwards."""
        reason = slurm_missing()
        if reason:
            pytest.skip(reason)
        cluster = _session_cluster(request.config, tmp_path_factory)
        with cluster.activated():
            yield cluster
        cluster.cancel_all()
