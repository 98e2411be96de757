"""Every strategy's stop vote under a real mpiexec, without TensorFlow (fast).

    python stop_votes.py RANK AT STEPS

Rank RANK is asked to stop from its step AT on (RANK -1: nobody is). For each strategy the
ranks take STEPS steps of uneven length (they drift apart as real ones do), as the trainer
does: the strategy's own per-step work, then `stop_agreed`; each records the first step
after which it said yes, and keeps stepping, so that ranks that disagree (a bug) finish
instead of deadlocking. Then `stop_vote` (the epoch-end vote). Rank 0 prints one JSON
line: {strategy: {"stopped": [step per rank], "vote": [epoch-end answer per rank]}}.
"""

import json
import sys
import time
from collections.abc import Callable

import numpy as np

from mpitrain.parallel.comm import world
from mpitrain.parallel.strategies import make_sync, names


class Var:
    """What FlatVars needs of a Keras variable."""

    def __init__(self, n):
        self.value, self.shape, self.dtype = np.zeros(n, np.float32), (n,), "float32"

    def numpy(self):
        return self.value

    def assign(self, value):
        self.value = np.asarray(value, np.float32).copy()


class Model:
    def __init__(self):
        self.weights, self.non_trainable_weights = [Var(5)], []


class Optimizer:
    variables: list[Var] = []


def asked_from(now: list[int]) -> Callable[[], bool]:
    """Whether this rank is asked to stop, at the step held in `now`."""
    return lambda: comm.rank == ASKED and now[0] >= AT


comm = world()
ASKED, AT, STEPS = (int(a) for a in sys.argv[1:4])
result = {}
for name in names():
    now = [0]
    sync = make_sync(name, comm, 4 if name == "local-sgd" else None, stop_requested=asked_from(now))
    sync.start(Model(), Optimizer())
    stopped = None
    for step in range(1, STEPS + 1):
        now[0] = step
        time.sleep(0.001 * ((step * (comm.rank + 2)) % 4))
        if sync.per_step_reduce:
            sync.reduce_step(np.ones(3, np.float32))  # what the compiled step does
        sync.after_step(step, STEPS, 1)
        if sync.stop_agreed(step, STEPS) and stopped is None:
            stopped = step
    sync.end_epoch()
    answers = comm.allgather_obj((stopped, sync.stop_vote()))
    result[name] = {"stopped": [a[0] for a in answers], "vote": [a[1] for a in answers]}
if comm.rank == 0:
    print(json.dumps(result))
