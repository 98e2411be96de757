"""Process set-up shared by every command: cores, threads per rank, seeds, precision, a quiet
TensorFlow.

One home for these rules, so that `train`, `evaluate`, `predict` and `bench` set up a process
the same way without importing each other.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm

# --precision: the Keras dtype policy of each choice ("auto" is resolved first, see
# `resolve_precision`). The mixed policies compute in 16 bits and keep every variable
# (weights, optimizer state, batch-norm statistics) in float32.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def available_cores() -> int:
    """CPUs this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def available_memory(meminfo: str = "/proc/meminfo", cgroup: str | None = None) -> int | None:
    """Bytes this process can still allocate without swapping: /proc/meminfo's MemAvailable,
    or less where the limit of our cgroup (v2: memory.max less memory.current) leaves less;
    None where neither is known (not Linux)."""
    cgroup = _own_cgroup() if cgroup is None else cgroup
    figures = []
    try:
        with open(meminfo) as f:
            figures += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path(cgroup, "memory.max").read_text().strip()
        if limit != "max":
            figures.append(max(0, int(limit) - int(Path(cgroup, "memory.current").read_text())))
    except (OSError, ValueError):
        pass
    return min(figures) if figures else None


def _own_cgroup() -> str:
    """This process's cgroup v2 folder (/proc/self/cgroup's "0::/path")."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line.strip()[3:] for line in f if line.startswith("0::")), "/")
    except OSError:
        path = "/"
    return "/sys/fs/cgroup" + path.rstrip("/")


def oversubscribed(ranks_on_node: int, cores: int) -> bool:
    """More ranks on a node than it has cores: MPI ranks waiting in a collective must then
    yield their core (Open MPI's `mpi_yield_when_idle`) instead of busy-polling it, or they
    take it from the ranks that are computing (measured: an epoch of 4 ranks on 2 cores,
    10.3 s polling, 3.1 s yielding)."""
    return ranks_on_node > cores


STARTED_ENV = "MPITRAIN_STARTED"  # set by `mpitrain <command> -n N` for its ranks: the launcher's start
_started: float | None = None


def process_start_time() -> float:
    """Wall-clock time (as `time.time()`) at which this process started; now if unknown.

    Linux: from the start tick in /proc/self/stat and the uptime, so interpreter start-up
    and imports are included.
    """
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def mark_started(when: float) -> None:
    """Record when the command started (the cli calls it first thing)."""
    global _started
    _started = when


def started_at(launched_by_mpi: bool) -> float:
    """When the command started: for a rank, the start of the `-n N` launcher if one started
    it (else the rank's own); otherwise the `mark_started` time, else this process's start."""
    launched = os.environ.get(STARTED_ENV)
    if launched and launched_by_mpi:
        try:
            return float(launched)
        except ValueError:
            pass
    return _started if _started is not None else process_start_time()


def import_tensorflow():
    """Import TensorFlow without its start-up banner.

    TensorFlow's C++ side prints absl and oneDNN notices straight to file descriptor 2 while
    it loads, whatever TF_CPP_MIN_LOG_LEVEL says. Under mpiexec that is two lines per rank
    before anything useful. We point fd 2 at /dev/null for the import only; a failing import
    still raises its Python exception. MPITRAIN_TF_VERBOSE=1 shows everything.
    """
    if "tensorflow" in sys.modules or os.environ.get("MPITRAIN_TF_VERBOSE") == "1":
        import tensorflow

        return tensorflow
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_fd2():
        import keras  # noqa: F401  (loads the TF backend while fd 2 is quiet)
        import tensorflow
    return tensorflow


@contextlib.contextmanager
def quiet_fd2():
    """File descriptor 2 points at /dev/null inside the block: for C++ libraries (TensorFlow,
    TFLite) that print notices straight to it whatever their log level says. Python
    exceptions still propagate; MPITRAIN_TF_VERBOSE=1 shows everything."""
    if os.environ.get("MPITRAIN_TF_VERBOSE") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (or of the given text); empty if unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:  # not Linux
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM; every core lists the same
            return set(value.split())
    return set()


def gpu_capabilities() -> list[tuple[int, int]]:
    """CUDA compute capability of each visible GPU ([] without GPUs or a CUDA TensorFlow)."""
    tf = import_tensorflow()
    out = []
    for gpu in tf.config.list_physical_devices("GPU"):  # does not initialise the runtime
        try:
            cc = tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        except (RuntimeError, ValueError):
            cc = (0, 0)
        out.append(tuple(cc))
    return out


def resolve_precision(
    requested: str, cpuinfo: str | None = None, gpus: list[tuple[int, int]] | None = None
) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why) for a --precision value.

    "auto" is bf16 where the hardware computes in bfloat16 natively: with GPUs, when every
    one has compute capability >= 8.0 (Ampere on); on CPUs, with the avx512_bf16 or
    amx_bf16 flag. Otherwise fp32. Never fp16: that needs loss scaling and is a choice.
    `cpuinfo` (the text of /proc/cpuinfo) and `gpus` (compute capabilities) are for tests.
    """
    if requested != "auto":
        return requested, "requested"
    gpus = gpu_capabilities() if gpus is None else gpus
    if gpus:
        if all(cc >= (8, 0) for cc in gpus):
            return "bf16", f"auto: every GPU supports bfloat16 (compute capability {min(gpus)[0]}.{min(gpus)[1]}+)"
        return "fp32", "auto: a GPU without bfloat16 support (compute capability < 8.0)"
    found = sorted(cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS))
    if found:
        return "bf16", f"auto: CPU flag {', '.join(found)}"
    return "fp32", f"auto: the CPU has neither {' nor '.join(BF16_CPU_FLAGS)}"


def set_precision(precision: str) -> None:
    """Keras' global dtype policy for the models built from now on (fp32 | bf16 | fp16)."""
    import keras

    keras.config.set_dtype_policy(POLICIES[precision])


def cpu_set() -> frozenset[int]:
    """The CPUs this process may run on (its affinity: a launcher's or Slurm's binding, a
    cgroup), or range(cpu_count) where affinity is unknown."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return frozenset(range(os.cpu_count() or 1))


def ranks_sharing_cores(comm: Comm) -> int:
    """Collective (every rank calls it once, at start-up): how many ranks of this node may
    run on this rank's CPUs, itself included. Ranks started with `--bind-to none` share the
    node's CPUs (all of them count); ranks bound to cores of their own (srun's binding,
    --cpus-per-task, mpiexec's default --bind-to core) count only themselves."""
    mine = cpu_set()
    # Collective over the world, answered per node: the CPU sets of this node's ranks.
    others = comm.node_allgather_obj(sorted(mine))
    return max(1, sum(1 for cpus in others if mine & set(cpus)))


def threads_per_rank(
    threads: int | None, sharing: int, cores: int | None = None, cpus_per_task: int | None = None
) -> int:
    """TensorFlow threads for one rank: --threads if given; else Slurm's
    SLURM_CPUS_PER_TASK (at most the CPUs the rank may use); else the rank's CPUs divided
    among the `sharing` ranks that may run on them (`ranks_sharing_cores`), so a rank bound
    to K CPUs of its own uses K threads and N unbound ranks split the node."""
    if threads:
        return threads
    cores = available_cores() if cores is None else cores
    if cpus_per_task:
        return max(1, min(cpus_per_task, cores))
    return max(1, cores // max(1, sharing))


def pin_gpu(local_rank: int, local_size: int, tf=None) -> str | None:
    """With GPUs visible, this rank takes the GPU of its local rank and sees only that one
    (ranks beyond the GPU count share them round-robin, growing their memory as needed
    instead of each taking all of it). Must run before TensorFlow initialises its devices.
    Returns the GPU's name, None without GPUs. `tf`: for tests."""
    tf = import_tensorflow() if tf is None else tf
    gpus = tf.config.list_physical_devices("GPU")  # does not initialise the devices
    if not gpus:
        return None
    gpu = gpus[local_rank % len(gpus)]
    try:
        tf.config.set_visible_devices([gpu], "GPU")
        if local_size > len(gpus):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # already initialised (second run in one process, e.g. tests)
        pass
    return gpu.name


def configure_rank(comm: Comm, seed: int, threads: int | None, precision: str = "fp32", overlap: bool = False) -> int:
    """`configure_runtime` for one rank of `comm` (train, evaluate, bench). Collective:
    every rank calls it once, at start-up (`ranks_sharing_cores`). `overlap`: the run may
    sum its gradients during backprop (--overlap not off, a strategy that can, ranks > 1)."""
    sharing = ranks_sharing_cores(comm)
    return configure_runtime(seed, threads, sharing, precision, comm.local_rank, comm.local_size, overlap)


def configure_runtime(
    seed: int,
    threads: int | None,
    sharing: int,
    precision: str = "fp32",
    local_rank: int = 0,
    local_size: int = 1,
    overlap: bool = False,
) -> int:
    """This rank's GPU (the one of its local rank, see `pin_gpu`), its threads
    (`threads_per_rank`: --threads, Slurm's --cpus-per-task, or its CPUs split among the
    `sharing` ranks that may run on them), seeded determinism and the dtype policy of the
    models built afterwards (`precision`, resolved: not "auto").

    Must run before TensorFlow executes its first op. Returns the threads per rank.
    """
    from mpitrain import slurm

    tf = import_tensorflow()
    import keras

    pin_gpu(local_rank, local_size, tf)
    n = threads_per_rank(threads, sharing, cpus_per_task=slurm.cpus_per_task())
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        # --overlap: at least 2. With one inter-op thread TensorFlow runs a step's ready ops
        # from one queue, and the bucket starts then wait until backprop has ended (measured:
        # ResNet-50 at 1 thread started its first bucket 0.08 s before the step's end, with
        # 2 inter-op threads 3 s before). Not otherwise: a second inter-op thread runs
        # independent kernels side by side, which on cores the ranks already fill slowed
        # ResNet-50's step by about 13 % (docs/benchmarks.md).
        tf.config.threading.set_inter_op_parallelism_threads(max(n, 2) if overlap else n)
    except RuntimeError:  # already initialised (second run in one process, e.g. tests)
        pass
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    set_precision(precision)
    return n
