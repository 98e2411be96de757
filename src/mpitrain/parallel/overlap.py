"""--overlap: a step's gradient sum in buckets, each started as soon as backprop has made its
gradients, while the earlier layers are still being differentiated.

Backprop makes the last layers' gradients first. The train step (`engine/steps.py`) cuts the
gradients into buckets of about --bucket-mb (`plan`: from the last variable backwards) and
hands each bucket to its strategy's `start_bucket` through a `tf.numpy_function` as soon as
its gradients exist; an `Exchange` thread sums the buckets over the ranks one after another,
in the order they were started, while TensorFlow goes on computing. The step's
`finish_buckets`, its last op before the update, waits for them all.

The same update as one fused sum: every element is summed over the same ranks; only the
messages are cut differently. With two ranks a + b does not depend on that. With more, Open
MPI picks its algorithm (and so the order of the additions) by message size and by blocking
or not, which nothing here forces; measured on one host, 3 and 4 ranks gave the fused sum's
weights bit for bit with buckets of 0.2-4 MB (tests/system/test_overlap_mpi.py at 3).

Chained: every rank must start its collectives in the same order, and TensorFlow runs ready
ops in an order of its own choosing, so each bucket's start op takes the previous one's
token: buckets 0, 1, 2, ... on every rank.

A thread that polls: Open MPI moves a nonblocking collective on only inside MPI calls, so
someone must keep calling; a blocking call would spin on a core that TensorFlow's threads
need (a CPU rank uses every core it has). The thread tests its request and sleeps between
tests (doubling from 20 us up to POLL_SECONDS), which keeps a 1-10 Gbit/s link busy.

Errors: a sum that fails (a lost peer: RankLost) is kept and raised by `finish` on the
step's thread, so the step fails as it does without overlap; buckets queued after it are
dropped.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import numpy as np

POLL_SECONDS = 0.0005  # longest sleep between two tests of a bucket's request


def plan(sizes: list[int], bucket_bytes: float) -> list[list[int]]:
    """The variables' indices in buckets: bucket 0 holds the last variables (backprop makes
    their gradients first), and each bucket closes once it holds `bucket_bytes` of float32
    gradients (the last one may hold less). Ascending within a bucket."""
    buckets: list[list[int]] = []
    current: list[int] = []
    nbytes = 0
    for i in reversed(range(len(sizes))):
        current.append(i)
        nbytes += 4 * sizes[i]
        if nbytes >= bucket_bytes:
            buckets.append(sorted(current))
            current, nbytes = [], 0
    if current:
        buckets.append(sorted(current))
    return buckets


def bucket_bytes(mode: str, bucket_mb: float, sizes: list[int], ranks: int, accumulate: int = 1) -> float:
    """--overlap MODE's bucket size in bytes for variables of `sizes` on `ranks` (0: off).
    auto: on where the gradients make more than one bucket (a single one cannot start before
    backprop has ended) and a step is one backprop (--accumulate's loop hands its sums over at
    its end). One rank has nothing to sum."""
    size = bucket_mb * 1e6
    if mode == "off" or ranks == 1:
        return 0.0
    if mode == "auto" and (accumulate > 1 or len(plan(sizes, size)) < 2):
        return 0.0
    return size


class Exchange:
    """A thread that runs `reduce(j, buffer)` for every bucket `j` started, in start order."""

    def __init__(self, reduce: Callable[[int, np.ndarray], np.ndarray]) -> None:
        self._reduce = reduce
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: dict[int, np.ndarray] = {}
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self.busy_seconds = 0.0  # inside the sums: the communication the overlap hid or not
        # A daemon: idle between steps, and left idle when an elastic job builds a new strategy.
        threading.Thread(target=self._run, name="mpitrain-overlap", daemon=True).start()

    def start(self, j: int, buffer: np.ndarray) -> None:
        """Queue bucket `j` (a buffer the exchange may keep and overwrite)."""
        self._jobs.put((j, buffer))

    def finish(self, count: int) -> list[np.ndarray]:
        """Wait for buckets 0 .. count-1 of this step; their sums in bucket order. Raises
        the first failure of this step's sums."""
        with self._cv:
            self._cv.wait_for(lambda: self._error is not None or len(self._done) >= count)
            if self._error is not None:
                raise self._error
            done, self._done = self._done, {}
        return [done[j] for j in range(count)]

    def _run(self) -> None:
        while True:
            j, buffer = self._jobs.get()
            if self._error is not None:
                continue  # the step has failed: its remaining buckets are dropped
            t = time.perf_counter()
            try:
                out = self._reduce(j, buffer)
            except BaseException as e:  # noqa: BLE001 - handed to the step's thread by finish()
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                continue
            self.busy_seconds += time.perf_counter() - t
            with self._cv:
                self._done[j] = out
                self._cv.notify_all()


def wait(test: Callable[[], bool]) -> None:
    """Until `test()` (a request's test) is true, sleeping between tests."""
    pause = 2e-5
    while not test():
        time.sleep(pause)
        pause = min(2 * pause, POLL_SECONDS)
