"""What Slurm tells a process through its environment: the one place that reads SLURM_*.

Two situations matter, and Slurm marks them with different variables:

* **Inside an allocation** (the shell of `sbatch` or `salloc`): SLURM_JOB_ID, the hosts in
  SLURM_JOB_NODELIST and, with --ntasks, SLURM_NTASKS. `mpitrain train -n N` runs Open
  MPI's mpiexec there, which reads the allocation by itself (hosts and slots) and starts
  its daemons with srun: the launcher must not override it (`launcher/mpiexec.py`).
* **A task of an srun step**: srun sets SLURM_STEP_ID and SLURM_STEP_NUM_TASKS (and
  SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS for the step). The batch script itself has
  SLURM_PROCID=0 and SLURM_NTASKS too, but no SLURM_STEP_* variables, so those tell an
  srun task from a process started in the batch script.

Nothing here imports MPI or TensorFlow: every function reads a mapping (the process
environment by default), so tests fake Slurm with a dict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


def _int(env: Mapping[str, str], name: str) -> int | None:
    """A positive whole number from `name`, None if unset or not one."""
    try:
        value = int(env.get(name, "").strip())
    except ValueError:
        return None
    return value if value >= 1 else None


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodelist: str  # Slurm's compact form, e.g. "node[01-04]"
    ntasks: int | None  # --ntasks of the job (None: not given)

    def describe(self) -> str:
        tasks = f", {self.ntasks} task(s)" if self.ntasks else ""
        return f"Slurm job {self.job_id} (hosts {self.nodelist}{tasks})"


def allocation(env: Mapping[str, str] | None = None) -> Allocation | None:
    """The Slurm allocation this process runs in, None outside Slurm."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job:
        return None
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "?"
    return Allocation(job, nodes, _int(env, "SLURM_NTASKS"))


def step_tasks(env: Mapping[str, str] | None = None) -> int | None:
    """How many tasks the srun step has that this process is a task of; None when it is
    not an srun task (no SLURM_STEP_NUM_TASKS, e.g. the batch script itself)."""
    env = os.environ if env is None else env
    if "SLURM_STEP_NUM_TASKS" not in env and "SLURM_STEP_ID" not in env:
        return None
    return _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS") or 1


def task_id(env: Mapping[str, str] | None = None) -> int:
    """SLURM_PROCID: this task's index in its step (0 when unset)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("SLURM_PROCID", "0"))
    except ValueError:
        return 0


def local_id(env: Mapping[str, str] | None = None) -> int | None:
    """SLURM_LOCALID of an srun task: its index among the step's tasks on this node."""
    env = os.environ if env is None else env
    if step_tasks(env) is None:
        return None
    try:
        return int(env["SLURM_LOCALID"])
    except (KeyError, ValueError):
        return None


def cpus_per_task(env: Mapping[str, str] | None = None) -> int | None:
    """SLURM_CPUS_PER_TASK (sbatch/srun --cpus-per-task) inside an allocation, else None."""
    env = os.environ if env is None else env
    if allocation(env) is None:
        return None
    return _int(env, "SLURM_CPUS_PER_TASK")


def srun_without_mpi(world_size: int, launcher_size: int | None, env: Mapping[str, str] | None = None) -> str | None:
    """The one-line reason to stop when srun started N > 1 tasks but MPI sees a world of
    `world_size` == 1: Open MPI 5 under srun without PMIx starts every task as its own
    "rank 0 of 1", and each would train a model of its own. `launcher_size`: the size an
    mpiexec announced (OMPI_COMM_WORLD_SIZE), which wins over Slurm's count (the ranks of
    an mpiexec inside an allocation inherit the variables of its daemons' srun step)."""
    tasks = step_tasks(env)
    if launcher_size is not None or tasks is None or tasks <= 1 or world_size != 1:
        return None
    return (
        f"srun started {tasks} tasks, but MPI sees each of them alone (a world of 1), so each "
        f"would train a model of its own: start them with `srun --mpi=pmix` (Open MPI 5 needs "
        f"PMIx), or run `mpitrain train -n {tasks}` (or mpirun) in the allocation instead of srun"
    )
