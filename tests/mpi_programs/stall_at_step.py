"""`mpitrain train` where rank STALL_RANK stops making progress (sleeps) in its 3rd step,
like a rank stuck reading from a dead network file system."""

import os
import sys
import time

import mpitrain.trainer as trainer
from mpitrain.cli import main
from mpitrain.comm import world

STALL_RANK = int(os.environ.get("STALL_RANK", "1"))
real_make = trainer.make_train_step


def stalling_make(*args, **kwargs):
    step = real_make(*args, **kwargs)
    calls = [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if world().rank == STALL_RANK and calls[0] == 3:
            time.sleep(3600)
        return step(*a, **k)

    return wrapped


trainer.make_train_step = stalling_make
sys.exit(main(sys.argv[1:]))
