"""--ema: the moving average of the weights, in the model wherever the model is judged.

Keras' optimizers keep the average themselves (`use_ema=True, ema_momentum=M`): after
every step each trainable variable's average becomes M x average + (1 - M) x weight (the
first step's is the weight itself). The averages are optimizer variables, so checkpoints,
the broadcast at the start and a lost rank's recovery carry them like Adam's moments, and
local-sgd averages them with the weights (`Sync.attach`).

Training goes on with the raw weights; validation, the callbacks at an epoch's end
(--keep-best keeps the averaged weights) and the model left at the end see the averages.
So at each epoch's end the averages are swapped in, and the raw weights back before the
checkpoint (which must hold the raw ones to continue exactly); at the end of training the
averages stay. FreezeBackbone's fresh optimizer start restarts the average too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from mpitrain.parallel.flat import moving_averages


class WeightAverage:
    """The model's averaged variables and the optimizer's averages of them (none without --ema)."""

    def __init__(self, optimizer):
        self.pairs = moving_averages(optimizer)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The averages in the model inside the block, the raw weights back after it (after
        an error too: a lost rank's recovery must adopt the raw ones)."""
        if not self.pairs:
            yield
            return
        raw = [np.array(w.numpy()) for w, _ in self.pairs]  # copies: the exact bits go back
        self.adopt()
        try:
            yield
        finally:
            for (w, _), r in zip(self.pairs, raw):
                w.assign(r)

    def adopt(self) -> None:
        """The averages in the model for good (the end of training)."""
        for w, a in self.pairs:
            w.assign(a)
