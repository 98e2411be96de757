"""Clusters, in-process with faked environments: what Slurm's variables mean, the launcher
inside an allocation, threads per rank from the CPU affinity, a GPU per local rank, and the
stop vote of each strategy on one process."""

from types import SimpleNamespace

import numpy as np
import pytest

from mpitrain import runtime, slurm
from mpitrain.errors import UserError
from mpitrain.launcher.mpiexec import in_allocation, mpiexec_command
from mpitrain.parallel.comm import local_rank_from
from mpitrain.parallel.strategies import make_sync

# What a batch script sees (sbatch --ntasks 4): SLURM_PROCID too, but no SLURM_STEP_*.
BATCH = {
    "SLURM_JOB_ID": "123",
    "SLURM_JOB_NODELIST": "node[01-02]",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_CPUS_PER_TASK": "3",
}
# What task 2 of `srun -n 4` sees.
TASK = dict(BATCH, SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="2", SLURM_LOCALID="1")


def test_the_batch_script_is_in_an_allocation_but_no_srun_task():
    alloc = slurm.allocation(BATCH)
    assert alloc == slurm.Allocation("123", "node[01-02]", 4)
    assert "Slurm job 123" in alloc.describe() and "node[01-02]" in alloc.describe()
    assert slurm.step_tasks(BATCH) is None and slurm.local_id(BATCH) is None
    assert slurm.allocation({}) is None and slurm.cpus_per_task({"SLURM_CPUS_PER_TASK": "3"}) is None


def test_an_srun_task_knows_its_step():
    assert slurm.step_tasks(TASK) == 4 and slurm.task_id(TASK) == 2 and slurm.local_id(TASK) == 1
    assert slurm.cpus_per_task(TASK) == 3
    assert slurm.cpus_per_task(dict(TASK, SLURM_CPUS_PER_TASK="x")) is None


@pytest.mark.parametrize("only", ["SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS"])
def test_either_step_variable_alone_marks_an_srun_task(only):
    # Slurm versions and launch paths differ in which of the two they set.
    task = {k: v for k, v in TASK.items() if not k.startswith("SLURM_STEP_") or k == only}
    assert slurm.step_tasks(task) == 4  # SLURM_STEP_NUM_TASKS, else the job's SLURM_NTASKS
    assert slurm.local_id(task) == 1
    assert slurm.srun_without_mpi(1, None, task) is not None


def test_srun_without_pmix_is_caught_only_when_mpi_sees_one_of_many():
    problem = slurm.srun_without_mpi(1, None, TASK)
    assert "srun started 4 tasks" in problem and "srun --mpi=pmix" in problem and "-n 4" in problem
    assert "\n" not in problem
    assert slurm.srun_without_mpi(4, None, TASK) is None  # srun --mpi=pmix: one world
    assert slurm.srun_without_mpi(1, None, BATCH) is None  # one process in the batch script
    assert slurm.srun_without_mpi(1, None, dict(TASK, SLURM_STEP_NUM_TASKS="1")) is None
    # A rank of `mpiexec -n 1` on an allocation's other node inherits its daemon's srun step.
    assert slurm.srun_without_mpi(1, 1, TASK) is None


def test_the_local_rank_comes_from_the_launcher_that_started_this_world():
    assert local_rank_from({"OMPI_COMM_WORLD_LOCAL_RANK": "3"}, split_rank=0, size=8) == 3
    assert local_rank_from(TASK, split_rank=0, size=4) == 1  # srun's tasks are this world
    # mpiexec's ranks inherit SLURM_LOCALID of its daemon (a step of 2 tasks): not theirs.
    assert local_rank_from(dict(TASK, SLURM_STEP_NUM_TASKS="2"), split_rank=5, size=8) == 5
    assert local_rank_from({}, split_rank=2, size=4) == 2  # another launcher: MPI's split


class NodeComm:
    """The CPU sets of the ranks of one node, as `node_allgather_obj` answers."""

    def __init__(self, sets):
        self.sets = sets

    def node_allgather_obj(self, obj):
        return [sorted(s) for s in self.sets]


@pytest.mark.parametrize(
    "mine, node, sharing",
    [
        ({0, 1, 2, 3}, [{0, 1, 2, 3}] * 4, 4),  # --bind-to none: all share the node
        ({0, 1}, [{0, 1}, {2, 3}, {4, 5}], 1),  # bound to CPUs of its own (srun -c 2)
        ({0, 1, 2, 3}, [{0, 1, 2, 3}, {0, 1, 2, 3}, {4, 5, 6, 7}, {4, 5, 6, 7}], 2),
    ],
)
def test_ranks_sharing_cores_counts_those_on_this_ranks_cpus(monkeypatch, mine, node, sharing):
    monkeypatch.setattr(runtime, "cpu_set", lambda: frozenset(mine))
    assert runtime.ranks_sharing_cores(NodeComm(node)) == sharing


def test_a_rank_bound_to_k_cpus_uses_k_threads():
    # 4 ranks on a node, each bound to 4 CPUs of its own: 4 threads each, not 4 // 4.
    assert runtime.threads_per_rank(None, sharing=1, cores=4) == 4
    # 4 unbound ranks sharing 16 CPUs: 4 each; more ranks than CPUs: still one each.
    assert runtime.threads_per_rank(None, sharing=4, cores=16) == 4
    assert runtime.threads_per_rank(None, sharing=5, cores=2) == 1


def test_slurm_cpus_per_task_wins_over_the_split_and_threads_win_over_both():
    assert runtime.threads_per_rank(None, sharing=4, cores=16, cpus_per_task=3) == 3
    assert runtime.threads_per_rank(None, sharing=1, cores=2, cpus_per_task=8) == 2  # no more than its CPUs
    assert runtime.threads_per_rank(5, sharing=4, cores=16, cpus_per_task=3) == 5


class FakeTF:
    """tf.config as pin_gpu uses it, recording what it was told."""

    def __init__(self, gpus):
        self.visible, self.growth = None, []
        devices = [SimpleNamespace(name=f"/physical_device:GPU:{i}") for i in range(gpus)]
        experimental = SimpleNamespace(set_memory_growth=lambda gpu, on: self.growth.append(gpu.name))
        self.config = SimpleNamespace(
            list_physical_devices=lambda kind: list(devices),
            set_visible_devices=self._visible,
            experimental=experimental,
        )

    def _visible(self, devices, kind):
        assert kind == "GPU"
        self.visible = [d.name for d in devices]


def test_each_rank_sees_only_the_gpu_of_its_local_rank():
    tf = FakeTF(gpus=4)
    assert runtime.pin_gpu(2, 4, tf) == "/physical_device:GPU:2"
    assert tf.visible == ["/physical_device:GPU:2"] and tf.growth == []


def test_more_ranks_than_gpus_share_them_round_robin_and_grow_memory():
    tf = FakeTF(gpus=2)
    assert runtime.pin_gpu(3, 4, tf) == "/physical_device:GPU:1"
    assert tf.visible == ["/physical_device:GPU:1"] and tf.growth == ["/physical_device:GPU:1"]


def test_without_gpus_nothing_is_hidden():
    tf = FakeTF(gpus=0)
    assert runtime.pin_gpu(1, 2, tf) is None and tf.visible is None


@pytest.fixture
def fake_allocation(monkeypatch):
    """An Open MPI mpiexec on a 2-core node inside Slurm job 123 with 4 tasks."""
    for var in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in BATCH.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr("mpitrain.launcher.mpiexec.is_open_mpi", lambda mpiexec: True)
    monkeypatch.setattr("mpitrain.launcher.mpiexec.available_cores", lambda: 2)
    monkeypatch.setattr("mpitrain.launcher.hosts.available_cores", lambda: 2)


def test_inside_an_allocation_mpiexec_gets_no_oversubscribe(fake_allocation):
    cmd, _ = mpiexec_command(4, ["python"], mpiexec="/opt/mpi/bin/mpiexec")
    assert "--oversubscribe" not in cmd and "--hostfile" not in cmd and "--host" not in cmd
    assert in_allocation(4, None) == (
        "mpitrain: 4 rank(s) on the hosts of Slurm job 123 "
        "(hosts node[01-02], 4 task(s)), placed by mpiexec from the allocation"
    )


def test_inside_an_allocation_slurm_decides_hosts_and_slots(fake_allocation):
    with pytest.raises(UserError, match=r"-n 5 is more than the 4 task\(s\) of Slurm job 123.*use -n 4"):
        in_allocation(5, None)
    with pytest.raises(UserError, match="--hostfile inside Slurm job 123"):
        in_allocation(2, "hosts")


def test_outside_an_allocation_nothing_changes(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_JOBID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("mpitrain.launcher.mpiexec.is_open_mpi", lambda mpiexec: True)
    monkeypatch.setattr("mpitrain.launcher.mpiexec.available_cores", lambda: 2)
    monkeypatch.setattr("mpitrain.launcher.hosts.available_cores", lambda: 2)
    assert in_allocation(4, None) is None
    assert "--oversubscribe" in mpiexec_command(4, ["python"], mpiexec="/opt/mpi/bin/mpiexec")[0]


class One:
    """A communicator of one rank (a step's stop vote needs no collective then)."""

    rank, size, local_size, local_rank = 0, 1, 1, 0

    def allreduce_max(self, value):
        return value


@pytest.mark.parametrize("name", ["allreduce", "local-sgd"])
def test_one_process_stops_at_the_next_step_after_the_request(name):
    asked = [False]
    sync = make_sync(name, One(), 4 if name == "local-sgd" else None, stop_requested=lambda: asked[0])
    assert not sync.stop_agreed(1, 10)
    asked[0] = True
    assert sync.stop_agreed(2, 10) and sync.stop_vote()


class Summing:
    """Two 'ranks' in one process: every sum adds what the other rank would send."""

    rank, size, local_size, local_rank = 0, 2, 1, 0

    def __init__(self, other_asks):
        self.other = other_asks

    def allreduce_sum_(self, buf):
        buf[-1] += self.other  # the vote slot: the other rank's answer
        return buf

    def allreduce_max(self, value):
        return max(value, self.other)

    def iallreduce_sum_(self, buf):
        buf[0] += self.other
        return "request"

    def test(self, request):
        return True


def test_a_request_on_another_rank_reaches_this_one_through_each_vote():
    # allreduce: in the gradient sum of the next step
    sync = make_sync("allreduce", Summing(1.0), None)
    out = sync.reduce_step(np.ones(3, np.float32))
    assert out.shape == (3,) and out.dtype == np.float32 and sync.stop_agreed(1, 10)
    quiet = make_sync("allreduce", Summing(0.0), None)
    quiet.reduce_step(np.ones(3, np.float32))
    assert not quiet.stop_agreed(1, 10)
    # master-worker: the nonblocking vote posted at step 8 is read at step 16
    mw = make_sync("master-worker", Summing(1.0), None)
    assert next(s for s in range(1, 31) if mw.stop_agreed(s, 30)) == 16
    assert mw._vote is None  # the ranks stop here: no vote is left pending
    assert mw.stop_vote()
