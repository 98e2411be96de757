"""`mpitrain train` where one rank fails in one of its steps, in one of three ways.

FAULT=raise  a Python exception (a bug, bad data): the job must end, not hang.
FAULT=kill   SIGKILL, which nothing can catch: what a lost node looks like to the others.
FAULT=stall  the rank sleeps, like one stuck on a dead network file system.

FAULT_RANK is the rank at start (ranks are renumbered after an elastic loss); FAULT_AT is
the rank's step count (1-based) at which it fails. Works without mpiexec too (rank 0).
"""

import os
import signal
import sys
import time

import mpitrain.train.trainer as trainer
from mpitrain.cli import main
from mpitrain.dist.comm import world

FAULT = os.environ.get("FAULT", "raise")
FAULT_RANK = int(os.environ.get("FAULT_RANK", "1"))
FAULT_AT = int(os.environ.get("FAULT_AT", "3"))
real_make = trainer.make_train_step


def faulty_make(*args, **kwargs):
    step = real_make(*args, **kwargs)
    calls = [0]

    def wrapped(*a, **k):
        calls[0] += 1
        comm = world()
        if comm.world_ranks[comm.rank] == FAULT_RANK and calls[0] == FAULT_AT:
            if FAULT == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif FAULT == "stall":
                time.sleep(3600)
            else:
                raise ValueError("injected failure for the test")
        return step(*a, **k)

    return wrapped


trainer.make_train_step = faulty_make
sys.exit(main(sys.argv[1:]))
