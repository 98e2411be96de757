"""allreduce (the default): every rank trains; gradients are summed after every step."""

from __future__ import annotations

import numpy as np

from mpitrain.dist.flat import float_vars
from mpitrain.dist.strategies.base import Sync


class AllreduceSync(Sync):
    """Gradients (with the step's sample count, loss sum and hits) summed every step."""

    name = "allreduce"

    def __init__(self, comm, sync_every=None, progress=None):
        super().__init__(comm, sync_every, progress)
        self.per_step_reduce = comm.size > 1

    def reduce_step(self, buf: np.ndarray) -> np.ndarray:
        # Called from tf.numpy_function inside the compiled step; every rank calls it once
        # per step, in step order, so the allreduces pair up. The input may alias TF
        # memory, so reduce a private copy.
        out = np.array(buf, dtype=np.float32, copy=True)
        self._timed(self.comm.allreduce_sum_, out)
        return out

    def end_epoch(self) -> None:
        # Trainable weights are identical by construction (same summed gradients, same
        # optimizer). Non-trainable float state (e.g. batch-norm statistics) is computed
        # from local batches and drifts, so it is averaged once per epoch.
        self._average_weights(float_vars(self.model.non_trainable_weights))
