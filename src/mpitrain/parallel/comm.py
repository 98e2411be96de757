"""The communication layer: the only module that imports mpi4py (in `_mpi()`).

Everything distributed goes through a `Comm`, the protocol below: the members the rest of
the package may use. Two siblings implement all of it (a unit test checks that neither
lacks a member, so a method cannot silently do nothing on one of them):

* `SingleComm` - one process, no MPI at all. Every collective is the identity. This is the
  path for `mpitrain train` without a launcher and for unit tests; it never imports mpi4py.
* `MPIComm` - a thin wrapper around an mpi4py communicator. Buffers travel with the
  uppercase (buffer) calls, never as pickles, except for tiny control messages
  (`allgather_obj`, `bcast_obj`), which carry only strings and numbers made by our own code.

`world()` picks one: MPI only when the process was started by an MPI launcher
(mpiexec/srun set well-known variables), so a plain `python -m mpitrain` never pays for
MPI initialisation and never depends on a working MPI install. `check_world()` stops the
tasks of an srun without PMIx, which all see a world of one (`slurm.py`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mpitrain import slurm
from mpitrain.errors import QuietExit, UserError

if TYPE_CHECKING:
    from types import ModuleType

    from mpi4py import MPI

# A nonblocking operation's handle, for `Comm.test` only: an mpi4py request under MPI, None
# alone (complete at once). Opaque to callers.
Request = Any
# `combine(a, b)` of `allreduce_op_`: stores a (+) b into b.
Combine = Callable[[np.ndarray, np.ndarray], object]

# Variables that MPI launchers set in every process they start.
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS")


def launched_by_mpi() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


def _mpi() -> ModuleType:
    """mpi4py's MPI module (importing it initialises MPI): the package's one mpi4py import."""
    _yield_if_oversubscribed(os.environ)
    from mpi4py import MPI

    return MPI


def _yield_if_oversubscribed(env: MutableMapping[str, str]) -> None:
    """Before MPI starts: when this node runs more ranks than it has cores, waiting ranks
    yield (Open MPI reads `mpi_yield_when_idle` at MPI_Init). Open MPI tells each rank how
    many ranks share its node; the launcher applies the same rule to its own host, but only
    a rank can count the cores of a node the launcher does not run on. A value set by the
    user is kept."""
    from mpitrain.runtime import available_cores, oversubscribed

    local = env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "")
    if local.isdigit() and oversubscribed(int(local), available_cores()):
        env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")


class Comm(Protocol):
    """A communicator: every member the rest of the package uses, and all it may use.

    Collectives must be called by every rank of the communicator, in the same order.
    Methods ending in `_` work in place on a contiguous numpy buffer and return it.
    """

    rank: int  # this process, 0 .. size-1
    size: int  # processes in the communicator
    local_size: int  # processes on this node (they share its cores)
    local_rank: int  # this process among them, 0 .. local_size-1 (which GPU it takes)
    elastic: bool  # after make_elastic(): a dead peer raises RankLost
    failed: bool  # a peer was found dead; shrink() before the next collective
    lost_any: bool  # a rank was lost during this run (leave without MPI_Finalize)
    world_ranks: list[int]  # current rank -> rank at start (they differ after a shrink)

    def make_elastic(self) -> None:
        """Collective. From now on a dead peer raises RankLost instead of ending the job."""

    def shrink(self) -> list[int]:
        """Collective among the survivors: drop the dead ranks; returns their start ranks."""

    def allreduce_sum_(self, buf: np.ndarray) -> np.ndarray:
        """Elementwise sum over all ranks, in place."""

    def allreduce_op_(self, buf: np.ndarray, combine: Combine) -> np.ndarray:
        """Elementwise reduction over all ranks with `combine(a, b)`, in place: a commutative
        numpy function that stores a (+) b into `b` (e.g. a sum in a format MPI lacks)."""

    def allreduce_max(self, value: float) -> float:
        """The largest `value` of all ranks."""

    def iallreduce_sum_(self, buf: np.ndarray) -> Request:
        """Nonblocking elementwise sum over all ranks into `buf`: a request for `test`;
        `buf` holds the sum once the request has completed (keep it alive until then)."""

    def iallreduce_op_(self, buf: np.ndarray, combine: Combine) -> Request:
        """Nonblocking `allreduce_op_`: a request for `test`, as `iallreduce_sum_`."""

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        """Root's buffer into every rank's buffer (same shape and dtype), in place."""

    def gather_flat(self, buf: np.ndarray, root: int = 0) -> np.ndarray | None:
        """Equal-sized 1-D buffers from every rank -> [size, n] on root (None elsewhere)."""

    def gather_rows(self, arr: np.ndarray, root: int = 0) -> np.ndarray | None:
        """Concatenate arrays of different lengths (same row shape) on root, in rank order."""

    def allgather_obj(self, obj: Any) -> list[Any]:
        """Every rank's small object, in rank order, on every rank (control messages only)."""

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        """Root's small object on every rank (metadata made by our own code)."""

    def node_allgather_obj(self, obj: Any) -> list[Any]:
        """Collective over every rank: the small objects of the ranks on this rank's node,
        in their local-rank order (start-up only: not renewed when an elastic job shrinks)."""

    def scatter_rows(self, parts: list[np.ndarray] | None, root: int = 0) -> np.ndarray:
        """Root holds one array per rank (same row shape and dtype); each rank gets its own."""

    def barrier(self) -> None:
        """Wait until every rank has arrived."""

    def ibarrier(self) -> Request:
        """Nonblocking barrier: a request to poll with `test` (progress pulses)."""

    def test(self, request: Request) -> bool:
        """Whether a nonblocking request has completed (never waits)."""

    def abort(self, code: int = 1) -> None:
        """End this process, and under MPI the whole job, with `code`; does not return."""


_NO_PARTS = "scatter_rows: the root rank passed no parts"


class SingleComm:
    """A communicator of one: every collective returns its input."""

    rank: int = 0
    size: int = 1
    local_size: int = 1
    local_rank: int = 0
    elastic: bool = False
    failed: bool = False
    lost_any: bool = False
    world_ranks: list[int]

    def __init__(self) -> None:
        self.world_ranks = [0]

    def make_elastic(self) -> None:
        pass  # nobody can be lost

    def shrink(self) -> list[int]:
        return []  # nobody was lost

    def allreduce_sum_(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def allreduce_op_(self, buf: np.ndarray, combine: Combine) -> np.ndarray:
        return buf

    def allreduce_max(self, value: float) -> float:
        return value

    def iallreduce_sum_(self, buf: np.ndarray) -> Request:
        return None  # complete at once: `test` says so

    def iallreduce_op_(self, buf: np.ndarray, combine: Combine) -> Request:
        return None

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        return buf

    def gather_flat(self, buf: np.ndarray, root: int = 0) -> np.ndarray | None:
        return buf[None, ...].copy()

    def gather_rows(self, arr: np.ndarray, root: int = 0) -> np.ndarray | None:
        return arr

    def allgather_obj(self, obj: Any) -> list[Any]:
        return [obj]

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        return obj

    def node_allgather_obj(self, obj: Any) -> list[Any]:
        return [obj]

    def scatter_rows(self, parts: list[np.ndarray] | None, root: int = 0) -> np.ndarray:
        if parts is None:
            raise ValueError(_NO_PARTS)
        return parts[0]

    def barrier(self) -> None:
        pass

    def ibarrier(self) -> Request:
        """Nonblocking barrier: returns a request for `test` (alone: already complete)."""
        return None

    def test(self, request: Request) -> bool:
        """Whether a nonblocking request has completed (never waits)."""
        return True

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class RankLost(RuntimeError):
    """A peer died during a collective (only raised in elastic mode, under ULFM)."""


class _FailureGuard:
    """Wraps an mpi4py communicator: a failed peer becomes RankLost on every survivor.

    The first rank to see the failure revokes the communicator, so that survivors blocked in
    a different collective (or not yet in one) get an error too instead of waiting forever.
    """

    def __init__(self, raw: MPI.Comm, owner: MPIComm) -> None:
        self._raw = raw
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._raw, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self.run(name, attr, *args, **kwargs)

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call `fn` (an MPI call on this communicator or one of its requests)."""
        owner, raw = self._owner, self._raw
        try:
            return fn(*args, **kwargs)
        except owner._MPI.Exception as e:
            if e.Get_error_class() not in owner._fault_classes and not _peer_failed(raw):
                raise
            owner.failed = True
            try:
                raw.Revoke()
            except owner._MPI.Exception:
                pass  # already revoked by another survivor
            raise RankLost(f"a peer was lost during {name}") from None


def _peer_failed(raw: MPI.Comm) -> bool:
    """Whether ULFM knows of a failed process in `raw`, or `raw` was revoked.

    A dead peer does not always come back as a fault class: Open MPI 5's nonblocking
    collectives (the progress pulses' Ibarrier) report a schedule aborted by the failure as
    MPI_ERR_OTHER ("Error in NBC_Start_round"), depending on how far each schedule had got.
    Asking the communicator tells a lost peer from a real error either way."""
    try:
        if raw.Is_revoked():
            return True
        failed = raw.Get_failed()
        try:
            return failed.Get_size() > 0
        finally:
            failed.Free()
    except Exception:  # noqa: BLE001 - no ULFM query: keep the error as it was
        return False


class MPIComm:
    """Collectives over an mpi4py communicator, always on contiguous numpy buffers."""

    rank: int
    size: int
    local_size: int
    local_rank: int
    elastic: bool = False
    failed: bool = False
    lost_any: bool = False
    world_ranks: list[int]
    _comm: MPI.Comm | _FailureGuard  # guarded once elastic

    def __init__(self, raw: MPI.Comm) -> None:
        MPI = self._MPI = _mpi()
        self._comm = raw
        self.rank = raw.Get_rank()
        self.size = raw.Get_size()
        # Ranks sharing this node (shared memory): they share its cores and its GPUs.
        self._node = raw.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_size = self._node.Get_size()
        self.local_rank = local_rank_from(os.environ, self._node.Get_rank(), self.size)
        self.world_ranks = list(range(self.size))

    def make_elastic(self) -> None:
        """Collective. From now on a dead peer raises RankLost instead of ending the job.

        Needs Open MPI's ULFM (`mpiexec --with-ft ulfm`); without it the launcher still
        ends the job when a process dies.
        """
        MPI = self._MPI
        self._fault_classes = {MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED}
        raw = self._comm.Dup()
        raw.Set_errhandler(MPI.ERRORS_RETURN)
        self._comm = _FailureGuard(raw, self)
        self.elastic = True

    def shrink(self) -> list[int]:
        """Collective among the survivors: drop the dead ranks; returns their start ranks."""
        MPI = self._MPI
        if not isinstance(self._comm, _FailureGuard):
            raise RuntimeError("shrink() needs make_elastic() first")
        raw = self._comm._raw
        new = raw.Shrink()
        new.Set_errhandler(MPI.ERRORS_RETURN)
        kept = MPI.Group.Translate_ranks(new.Get_group(), list(range(new.Get_size())), raw.Get_group())
        lost = [self.world_ranks[r] for r in range(raw.Get_size()) if r not in set(kept)]
        self.world_ranks = [self.world_ranks[r] for r in kept]
        self._comm = _FailureGuard(new, self)
        self.rank, self.size, self.failed = new.Get_rank(), new.Get_size(), False
        if not self.lost_any:
            import atexit

            atexit.register(_leave_without_finalize)  # a library script's exit (the CLI leaves earlier)
        self.lost_any = True
        return lost

    def allreduce_sum_(self, buf: np.ndarray) -> np.ndarray:
        # In place: one call for the whole fused buffer, no temporary per tensor.
        self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        return buf

    def allreduce_op_(self, buf: np.ndarray, combine: Combine) -> np.ndarray:
        self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._op(combine, buf.dtype))
        return buf

    def iallreduce_op_(self, buf: np.ndarray, combine: Combine) -> Request:
        return self._comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._op(combine, buf.dtype))

    def _op(self, combine: Combine, dtype: np.dtype) -> Any:
        # One user-defined MPI operation per (combine, dtype), made once: MPI applies it to
        # pieces of the buffer in whatever order its algorithm chooses, so it must commute.
        # The order is fixed for a given size and rank count, so runs repeat bit for bit.
        key = (combine, dtype.str)
        ops = self.__dict__.setdefault("_ops", {})
        if key not in ops:

            def apply(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
                combine(np.frombuffer(inbuf, dtype=dtype), np.frombuffer(inoutbuf, dtype=dtype))

            ops[key] = self._MPI.Op.Create(apply, commute=True)
        return ops[key]

    def allreduce_max(self, value: float) -> float:
        buf = np.array([value], dtype=np.float64)
        self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.MAX)
        return float(buf[0])

    def iallreduce_sum_(self, buf: np.ndarray) -> Request:
        return self._comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        self._comm.Bcast(buf, root=root)
        return buf

    def gather_flat(self, buf: np.ndarray, root: int = 0) -> np.ndarray | None:
        """Equal-sized 1-D buffers from every rank -> [size, n] on root."""
        out = np.empty((self.size, buf.size), dtype=buf.dtype) if self.rank == root else None
        self._comm.Gather(np.ascontiguousarray(buf), out, root=root)
        return out

    def gather_rows(self, arr: np.ndarray, root: int = 0) -> np.ndarray | None:
        """Concatenate arrays of different lengths (same row shape) on root, in rank order."""
        arr = np.ascontiguousarray(arr)
        row = int(np.prod(arr.shape[1:], dtype=np.int64))
        counts = np.array(self._comm.allgather(int(arr.shape[0])), dtype=np.int64)
        if self.rank == root:
            out = np.empty((int(counts.sum()),) + arr.shape[1:], dtype=arr.dtype)
            self._comm.Gatherv(arr.reshape(-1), [out.reshape(-1), counts * row], root=root)
            return out
        self._comm.Gatherv(arr.reshape(-1), None, root=root)
        return None

    def allgather_obj(self, obj: Any) -> list[Any]:
        # Small control messages only (error strings, hashes); never model data.
        return self._comm.allgather(obj)

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        # Small metadata only (class names, labels), produced by our own code on root.
        return self._comm.bcast(obj, root=root)

    def node_allgather_obj(self, obj: Any) -> list[Any]:
        # Small facts about each process of this node (its CPU set), on the node's own
        # communicator: every rank calls it, and each node's ranks exchange among themselves.
        return self._node.allgather(obj)

    def scatter_rows(self, parts: list[np.ndarray] | None, root: int = 0) -> np.ndarray:
        """Root holds one array per rank (same row shape and dtype); each rank gets its own."""
        meta = self.bcast_obj(
            None if parts is None else ([len(p) for p in parts], parts[0].shape[1:], parts[0].dtype.str), root
        )
        if meta is None:  # on every rank alike, so none is left waiting
            raise ValueError(_NO_PARTS)
        counts, row_shape, dtype = meta
        row = int(np.prod(row_shape, dtype=np.int64))
        out = np.empty((counts[self.rank],) + tuple(row_shape), dtype=np.dtype(dtype))
        send = None
        if self.rank == root and parts is not None:
            flat = np.concatenate([np.ascontiguousarray(p).reshape(-1) for p in parts])
            send = [flat, np.asarray(counts, dtype=np.int64) * row]
        self._comm.Scatterv(send, out.reshape(-1), root=root)
        return out

    def barrier(self) -> None:
        self._comm.Barrier()

    def ibarrier(self) -> Request:
        return self._comm.Ibarrier()

    def test(self, request: Request) -> bool:
        # A request's Test is an MPI call on our communicator too: under --elastic a peer
        # lost meanwhile must become RankLost here as in any collective.
        if isinstance(self._comm, _FailureGuard):
            return bool(self._comm.run("Test", request.Test))
        return bool(request.Test())

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._comm.Abort(code)


def local_rank_from(env: Mapping[str, str], split_rank: int, size: int) -> int:
    """This process's index among the ranks on its node: the launcher's own variable when
    it says so for this world (Open MPI's mpiexec: OMPI_COMM_WORLD_LOCAL_RANK; srun:
    SLURM_LOCALID, trusted only when the srun step's tasks are this world's ranks, since the
    ranks of an mpiexec inside an allocation inherit its daemons' SLURM_LOCALID), else the
    rank in MPI's shared-memory split of the node."""
    value = env.get("OMPI_COMM_WORLD_LOCAL_RANK")
    if value is None and slurm.step_tasks(env) == size:
        value = env.get("SLURM_LOCALID")
    try:
        return int(value) if value is not None else split_rank
    except ValueError:
        return split_rank


_WORLD: Comm | None = None


def world() -> Comm:
    """The process-wide communicator (created once)."""
    global _WORLD
    if _WORLD is None:
        if launched_by_mpi():
            whole = _mpi().COMM_WORLD
            _WORLD = MPIComm(whole) if whole.Get_size() > 1 else SingleComm()
            from mpitrain.parallel.wire import first_contact

            first_contact(_WORLD)  # collective: the ranks' first message, watched by our launcher
        else:
            _WORLD = SingleComm()
    return _WORLD


def check_world() -> None:
    """Stop when the processes a launcher started do not form one MPI world: srun without
    PMIx starts N tasks that each see a world of 1. Task 0 says why (UserError: one line,
    exit 2); the others stop quietly with the same code, so the job log has one line."""
    announced = os.environ.get("OMPI_COMM_WORLD_SIZE")
    problem = slurm.srun_without_mpi(world().size, int(announced) if announced else None)
    if problem is None:
        return
    if slurm.task_id() == 0:
        raise UserError(problem)
    raise QuietExit(2)


def exit_if_a_rank_was_lost(code: int) -> None:
    """After an elastic loss, leave now, with `code`, without MPI_Finalize.

    Finalize synchronises with every process the job started, dead ones included, and under
    ULFM it has been seen to wait forever after a lost rank. Everything is written and
    flushed by now, and Open MPI's ULFM mode accepts the exit code as it is.
    """
    if _WORLD is not None and _WORLD.lost_any:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _leave_without_finalize() -> None:
    """At the exit of a script whose job lost a rank (`mpitrain.fit(..., elastic=True)`):
    `exit_if_a_rank_was_lost` with 0, or 1 after an uncaught exception (its traceback is
    printed by then). A `sys.exit(code)`'s code is not known here: it becomes 0."""
    exit_if_a_rank_was_lost(1 if getattr(sys, "last_value", None) is not None else 0)


def current() -> Comm | None:
    """The communicator if `world()` has made one, without starting MPI."""
    return _WORLD


def abort_started(code: int = 1) -> None:
    """MPI_Abort the whole job if this process has started MPI (through `world()` or the
    caller's own mpi4py), without starting it otherwise: a process that never joined MPI
    ends by its exit code, which the launcher reports."""
    if _WORLD is not None and _WORLD.size > 1:
        _WORLD.abort(code)
    mpi4py = sys.modules.get("mpi4py.MPI")
    if mpi4py is not None and mpi4py.Is_initialized() and not mpi4py.Is_finalized():
        mpi4py.COMM_WORLD.Abort(code)
