"""allreduce (the default): every rank trains; gradients are summed after every step.

`--compress bf16` halves the bytes of that sum: the fused gradient buffer travels and is
summed in bfloat16 (float32's sign, exponent and top 7 mantissa bits: the same range, about
3 significant digits), rounded to nearest even, and is expanded back to float32 before the
optimizer. The step's statistics (samples, loss sum, hits) stay exact in float32, so the
divisor of the mean gradient and the metrics are unchanged. No state is kept (no error
feedback), so checkpoints and --resume are exact as without compression.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from mpitrain.parallel.overlap import Exchange, plan, wait
from mpitrain.parallel.strategies.base import Sync

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm

_BF16_NAN = np.uint16(0x7FC0)


def to_bf16(x: np.ndarray, scratch: bool = False) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest, ties to even; NaN stays NaN.
    `scratch`: `x` may be overwritten (saves a copy; this runs inside every step)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    nan = np.isnan(x)
    bits = x.view(np.uint32) if scratch else x.view(np.uint32).copy()
    carry = bits >> 16
    carry &= 1
    carry += 0x7FFF
    bits += carry  # round to nearest even at bit 16
    bits >>= 16
    out = bits.astype(np.uint16)
    if nan.any():
        out[nan] = _BF16_NAN  # the rounding carry could turn a NaN's bits into inf
    return out


def from_bf16(h: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    bits = h.astype(np.uint32)
    bits <<= 16
    return bits.view(np.float32)


def bf16_add(a: np.ndarray, b: np.ndarray) -> None:
    """b = a + b in bfloat16 (summed in float32, rounded once): the MPI operation of the
    compressed allreduce. Commutative, as MPI requires."""
    total = from_bf16(a)
    total += from_bf16(b)
    b[:] = to_bf16(total, scratch=True)


class AllreduceSync(Sync):
    """Gradients (with the step's sample count, loss sum and hits) summed every step."""

    name = "allreduce"
    compressions = ("none", "bf16")
    overlaps = True

    def __init__(
        self,
        comm: Comm,
        sync_every: int | None = None,
        progress: Callable[[str], None] | None = None,
        stop_requested: Callable[[], bool] | None = None,
        compress: str = "none",
        bucket_bytes: float = 0.0,
    ) -> None:
        super().__init__(comm, sync_every, progress, stop_requested, compress, bucket_bytes)
        self.per_step_reduce = comm.size > 1
        self._stop = False  # the stop vote of the last step's allreduce
        # --overlap: the step's buckets are summed by this thread while backprop goes on.
        self.exchange = Exchange(self._sum_bucket) if self.per_step_reduce and bucket_bytes else None

    def reduce_step(self, buf: np.ndarray) -> np.ndarray:
        # Called from tf.numpy_function inside the compiled step; every rank calls it once
        # per step, in step order, so the allreduces pair up. The input may alias TF
        # memory, so reduce a private copy, one slot longer: the stop vote rides along, so
        # agreeing to stop costs no collective of its own.
        out = np.empty(buf.size + 1, dtype=np.float32)
        out[:-1] = buf
        out[-1] = self._asked()
        self._sum(out, tail=4, polled=False)
        self._stop = bool(out[-1] > 0)
        return out[:-1]

    # ---- --overlap (parallel/overlap.py): the same sums, bucket by bucket ----

    def plan(self, sizes: list[int]) -> list[list[int]]:
        """The step's buckets of variable indices (bucket 0: the last variables)."""
        return plan(sizes, self.bucket_bytes)

    def start_bucket(self, j: int, buf: np.ndarray, token: np.ndarray) -> np.ndarray:
        """In the step (a numpy_function): hand bucket `j` to the exchange thread. Bucket 0
        carries the step's statistics in its last 3 slots, and the stop vote is added here,
        as `reduce_step` adds it. Returns the token the next bucket's start waits for."""
        out = np.empty(buf.size + (j == 0), dtype=np.float32)  # private: `buf` may alias TF memory
        out[: buf.size] = buf
        if j == 0:
            out[-1] = self._asked()
        self.exchange.start(j, out)
        return np.asarray(token + 1, dtype=np.int32)

    def finish_buckets(self, count: int, token: np.ndarray) -> list[np.ndarray]:
        """In the step, last before the update: the `count` buckets' sums (bucket 0 without
        the vote). Only the wait counts as communication: the rest was hidden by backprop."""
        t = time.perf_counter()
        outs = self.exchange.finish(count)
        self.comm_seconds += time.perf_counter() - t
        self._stop = bool(outs[0][-1] > 0)
        outs[0] = outs[0][:-1]
        return outs

    @property
    def hidden_seconds(self) -> float:
        return self.exchange.busy_seconds if self.exchange is not None else 0.0

    def _sum_bucket(self, j: int, out: np.ndarray) -> np.ndarray:
        # In the exchange thread: bucket 0's last 4 slots are the statistics and the vote.
        self._sum(out, tail=4 if j == 0 else 0, polled=True)
        return out

    def _sum(self, out: np.ndarray, tail: int, polled: bool) -> None:
        """Sum `out` (a private buffer) over the ranks in place; its last `tail` slots are
        statistics, exact in float32 whatever --compress. `polled`: nonblocking, tested
        until done (the exchange thread); else one blocking call, timed."""
        if self.compress == "bf16":
            # Two collectives, in this order on every rank: the gradients in bfloat16 (half
            # the bytes of the big one), then the statistics and the stop vote in float32
            # (16 bytes: exact counts and loss sums for the mean's divisor and the metrics,
            # and an exact vote).
            n = out.size - tail
            stats = out[n:].copy()
            grads = to_bf16(out[:n], scratch=True)  # `out` is our private copy
            self._collective(grads, bf16_add, polled)
            if tail:
                self._collective(stats, None, polled)
            out[:n], out[n:] = from_bf16(grads), stats
        else:
            # One collective: the whole fused float32 buffer, statistics and vote included.
            self._collective(out, None, polled)

    def _collective(self, buf: np.ndarray, combine, polled: bool) -> None:
        comm = self.comm
        if polled:
            request = comm.iallreduce_sum_(buf) if combine is None else comm.iallreduce_op_(buf, combine)
            wait(lambda: comm.test(request))
        elif combine is None:
            self._timed(comm.allreduce_sum_, buf)
        else:
            self._timed(comm.allreduce_op_, buf, combine)

    def stop_agreed(self, step: int, steps: int) -> bool:
        # The vote travelled with this step's gradients: every rank has the same sum.
        if not self.per_step_reduce:
            return super().stop_agreed(step, steps)
        return self._stop

    def end_epoch(self) -> None:
        # Trainable weights are identical by construction (same summed gradients, same
        # optimizer). Non-trainable float state (e.g. batch-norm statistics) is computed
        # from local batches and drifts, so it is averaged once per epoch (that of the layers
        # that train: a frozen layer's is the same everywhere, see `Sync.attach`).
        self._average_weights(self.statistics)
