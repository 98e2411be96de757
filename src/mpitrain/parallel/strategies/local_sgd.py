"""local-sgd: independent steps, weights averaged every K steps and at every epoch end."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from mpitrain.parallel.strategies.base import Sync

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm


class LocalSGDSync(Sync):
    """Independent steps; weights averaged every K steps and at every epoch end.

    Optimizer state (Adam moments, momentum) stays local: averaging it would triple the
    traffic of each sync, and after a sync every rank's state still describes the same
    recent gradient statistics of its own data, which is what it is used for. The one
    exception is --ema's moving average of the weights: it is what is validated and saved,
    so it is averaged with them, in the same buffer (every rank then holds the same).
    """

    name = "local-sgd"
    # --sync-every when not given (the K=4 rows of docs/benchmarks.md). The global batch
    # grows with the ranks as in allreduce, so "auto" lr stays the base class's sqrt
    # scaling with a cosine decay (measured best there).
    default_sync_every = 4

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
        self._stop = False  # the stop vote of the last average

    def after_step(self, step: int, steps: int, samples: int) -> None:
        if self.sync_every and step % self.sync_every == 0 and step != steps:
            # The stop vote rides in the average's buffer: decided every K steps, for free.
            self._stop = self._average_weights(self.trained + self.averages, vote=True)

    def stop_agreed(self, step: int, steps: int) -> bool:
        if self.comm.size == 1 or not self.sync_every:
            return super().stop_agreed(step, steps)
        stop, self._stop = self._stop, False
        return stop

    def end_epoch(self) -> None:
        self._average_weights(self.trained + self.averages)
