"""A real Slurm on this machine, for tests: munged, slurmctld and one slurmd, all private.

    with Slurm() as s:                        # needs root and Slurm's binaries
        s.run(["srun", "--mpi=pmix", "-n", "2", "mpitrain", "train", ...])
        job = s.sbatch(script, "--ntasks=2")
        s.wait(job, "COMPLETED")

Everything lives in a folder of its own (/tmp/mpt-slurm-TAG): the configuration, a munge
key and socket, the controller's state and the node's spool, the logs. The cluster's name
carries the same tag: a `StateSaveLocation` left by a cluster of another name makes
slurmctld refuse to start (CLUSTER NAME MISMATCH), and the machine's own /etc/slurm,
/etc/munge and /run/munge are never used or touched. Clients find the cluster through
`SLURM_CONF` (in `env()`). `close()` cancels the jobs and stops the daemons (also at exit).

The node says it has `cpus` CPUs whatever the machine has (`SlurmdParameters=
config_overrides`), so that tests on 2 cores can ask for 2 tasks of 2 CPUs.
Installing Slurm is not done here: `make slurm` (tests/install-slurm.sh) does it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("srun", "sbatch", "scontrol", "scancel", "squeue", "sinfo")
PLUGINS = ("/usr/lib/x86_64-linux-gnu/slurm-wlm", "/usr/lib64/slurm", "/usr/lib/slurm")


def unavailable() -> str | None:
    """Why a Slurm cannot be started here (None: it can)."""
    if not sys.platform.startswith("linux"):
        return "Slurm needs Linux"
    if os.geteuid() != 0:
        return "the test Slurm runs its daemons as root"
    missing = [t for t in DAEMONS + CLIENTS if shutil.which(t) is None]
    if missing:
        return f"Slurm is not installed (no {', '.join(missing)}): `make slurm` installs it with apt"
    if not any(Path(d, "mpi_pmix.so").exists() for d in PLUGINS):
        return "this Slurm has no PMIx plugin (mpi_pmix.so)"
    return None


def _die_with_parent() -> None:
    """In the daemon before exec: SIGTERM when the test process dies, however it dies (a
    killed pytest runs no atexit), so no daemon of a test cluster outlives its tests."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONF = """\
ClusterName={name}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={dir}/munge/munge.sock,cred_expire=5
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Seconds, not Slurm's minutes: a test's job ends, is requeued or is killed promptly.
KillWait=5
MinJobAge=300
SchedulerParameters=sched_interval=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=tests Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Slurm:
    def __init__(self, cpus: int = 4):
        self.tag = f"{os.getpid() % 4096:03x}{int(time.time() * 1000) % 4096:03x}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"mpt-slurm-{self.tag}-"))
        self.conf = self.dir / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        atexit.register(self.close)

    # -- daemons ---------------------------------------------------------------
    def start(self) -> Slurm:
        for sub in ("munge", "state", "spool"):
            (self.dir / sub).mkdir(mode=0o700)
        key = self.dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(
            CONF.format(
                name=f"mpt{self.tag}",
                host=self.host,
                dir=self.dir,
                cpus=self.cpus,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
            )
        )
        m = self.dir / "munge"
        self._daemon(
            "munged",
            "--foreground",
            "--force",
            f"--socket={m}/munge.sock",
            f"--key-file={key}",
            f"--pid-file={m}/munged.pid",
            f"--log-file={m}/munged.log",
            f"--seed-file={m}/seed",
        )
        self._until(lambda: (m / "munge.sock").exists(), 10, "munged did not start")
        self._daemon("slurmctld", "-D", "-f", str(self.conf))
        self._daemon("slurmd", "-D", "-f", str(self.conf), "-N", self.host)
        self._until(self._idle, 60, "the node did not become idle")
        return self

    def _daemon(self, *argv: str) -> None:
        log = open(self.dir / f"{argv[0]}.out", "w")  # noqa: SIM115 - open while the daemon runs
        self._procs.append(
            subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        )

    def _idle(self) -> bool:
        for name, p in zip(DAEMONS, self._procs):
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}: {self.logs()}")
        out = self.command(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip()
        return out == "idle"

    def _until(self, ready, seconds: float, why: str) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{why} in {seconds:g} s: {self.logs()}")
            time.sleep(0.2)

    def logs(self, tail: int = 2000) -> str:
        parts = []
        for name in ("munged.out", "slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"):
            p = self.dir / name
            if p.exists() and p.stat().st_size:
                parts.append(f"--- {name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.conf.exists():
            self.command(["scancel", "--full", "--quiet", "--user=root"], check=False)
        for p in reversed(self._procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self._procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Slurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- clients ---------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        """The caller's environment, the venv's bin first on PATH, and this cluster's SLURM_CONF."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["SLURM_CONF"] = str(self.conf)
        return dict(env, **(extra or {}))

    def command(self, argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        env = kw.pop("env", None) or self.env()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def run(self, argv: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        """A command (srun, salloc, ...) to its end; its output captured."""
        return self.command(argv, check=False, timeout=timeout, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """A command started in the background, its output piped (text)."""
        env = kw.pop("env", None) or self.env()
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)

    def sbatch(self, script: Path | str, *options: str, **kw) -> str:
        """Submits `script` (options before it, as sbatch takes them); the job id."""
        return self.command(["sbatch", "--parsable", *options, str(script)], **kw).stdout.strip().split(";")[0]

    def job(self, job: str) -> dict:
        """`scontrol show job`'s fields (JobState, Restarts, ExitCode, ...); {} once it is gone."""
        out = self.command(["scontrol", "show", "job", "-o", job], check=False).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job: str, *states: str, timeout: float = 300) -> dict:
        """Until the job's state is one of `states` (e.g. COMPLETED, FAILED); its fields then."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job)
            if fields.get("JobState") in states:
                return fields
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} is {fields.get('JobState')} after {timeout:g} s, not {states}")
            time.sleep(0.5)
