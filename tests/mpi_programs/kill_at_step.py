"""`mpitrain train` where rank KILL_RANK kills itself with SIGKILL at its KILL_AT-th step.

SIGKILL cannot be caught: no handler, no MPI_Abort, no flushing; it is what a lost node
looks like to the others. Works with and without mpiexec (rank 0 then)."""

import os
import signal
import sys

import mpitrain.trainer as trainer
from mpitrain.cli import main
from mpitrain.comm import world

KILL_RANK = int(os.environ.get("KILL_RANK", "1"))
KILL_AT = int(os.environ.get("KILL_AT", "10"))
real_make = trainer.make_train_step


def killing_make(*args, **kwargs):
    step = real_make(*args, **kwargs)
    calls = [0]

    def wrapped(*a, **k):
        calls[0] += 1
        comm = world()  # ranks are renumbered after a loss: compare the rank at start
        if comm.world_ranks[comm.rank] == KILL_RANK and calls[0] == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(*a, **k)

    return wrapped


trainer.make_train_step = killing_make
sys.exit(main(sys.argv[1:]))
