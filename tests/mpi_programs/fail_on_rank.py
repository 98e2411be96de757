"""`mpitrain train` where one rank raises in its third step; the job must end, not hang."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import mpitrain.trainer as trainer
from mpitrain.cli import main
from mpitrain.comm import world

FAIL_RANK = int(os.environ.get("FAIL_RANK", "1"))
real_make = trainer.make_train_step


def failing_make(*args, **kwargs):
    step = real_make(*args, **kwargs)
    calls = [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if world().rank == FAIL_RANK and calls[0] == 3:
            raise ValueError("injected failure for the test")
        return step(*a, **k)

    return wrapped


trainer.make_train_step = failing_make
sys.exit(main(sys.argv[1:]))
