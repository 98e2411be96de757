"""allreduce (the default): every rank trains; gradients are summed after every step."""

from __future__ import annotations

import numpy as np

from mpitrain.dist.flat import float_vars
from mpitrain.dist.strategies.base import Sync


class AllreduceSync(Sync):
    """Gradients (with the step's sample count, loss sum and hits) summed every step."""

    name = "allreduce"

    def __init__(self, comm, sync_every=None, progress=None, stop_requested=None):
        super().__init__(comm, sync_every, progress, stop_requested)
        self.per_step_reduce = comm.size > 1
        self._stop = False  # the stop vote of the last step's allreduce

    def reduce_step(self, buf: np.ndarray) -> np.ndarray:
        # Called from tf.numpy_function inside the compiled step; every rank calls it once
        # per step, in step order, so the allreduces pair up. The input may alias TF
        # memory, so reduce a private copy, one slot longer: the stop vote rides along, so
        # agreeing to stop costs no collective of its own.
        out = np.empty(buf.size + 1, dtype=np.float32)
        out[:-1] = buf
        out[-1] = self._asked()
        self._timed(self.comm.allreduce_sum_, out)
        self._stop = bool(out[-1] > 0)
        return out[:-1]

    def stop_agreed(self, step: int, steps: int) -> bool:
        # The vote travelled with this step's gradients: every rank has the same sum.
        if not self.per_step_reduce:
            return super().stop_agreed(step, steps)
        return self._stop

    def end_epoch(self) -> None:
        # Trainable weights are identical by construction (same summed gradients, same
        # optimizer). Non-trainable float state (e.g. batch-norm statistics) is computed
        # from local batches and drifts, so it is averaged once per epoch.
        self._average_weights(float_vars(self.model.non_trainable_weights))
