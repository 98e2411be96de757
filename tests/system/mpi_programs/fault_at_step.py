"""`mpitrain train` where one rank fails in one of its steps, in one of several ways.

FAULT=raise  a Python exception (a bug, bad data): the job must end, not hang.
FAULT=kill   SIGKILL, which nothing can catch: what a lost node looks like to the others.
FAULT=stall  the rank sleeps, like one stuck on a dead network file system.
FAULT=stop   SIGSTOP: the whole process freezes, its own watchdog thread included.
FAULT=slow   from step FAULT_AT on, every step of the rank first sleeps FAULT_SECONDS
             (default 1): a healthy but slow rank that keeps stepping.
FAULT=slow_validation  the rank's validation first sleeps FAULT_SECONDS per image.
FAULT=term / FAULT=usr1  SIGTERM / SIGUSR1 to itself (a batch system's stop request):
             the job checkpoints and stops with exit code 0.

FAULT_RANK is the rank at start (ranks are renumbered after an elastic loss), or several
separated by commas; FAULT_AT is the rank's step count (1-based) at which it fails.
SAVE_DELAY=S makes rank 0 sleep S seconds before writing each checkpoint (a master busy
after the epoch). Works without mpiexec too (rank 0).
"""

import os
import signal
import sys
import time

import mpitrain.engine.checkpoint as checkpoint
import mpitrain.engine.loop as trainer
from mpitrain.cli import main
from mpitrain.parallel.comm import world

FAULT = os.environ.get("FAULT", "raise")
FAULT_RANKS = {int(r) for r in os.environ.get("FAULT_RANK", "1").split(",")}
FAULT_AT = int(os.environ.get("FAULT_AT", "3"))
FAULT_SECONDS = float(os.environ.get("FAULT_SECONDS", "1"))
SAVE_DELAY = float(os.environ.get("SAVE_DELAY", "0"))
real_make = trainer.make_train_step
real_predict = trainer.make_predict_step
real_save = checkpoint.save


def faulty_make(*args, **kwargs):
    step = real_make(*args, **kwargs)
    calls = [0]

    def wrapped(*a, **k):
        calls[0] += 1
        comm = world()
        if comm.world_ranks[comm.rank] in FAULT_RANKS:
            if FAULT == "slow" and calls[0] >= FAULT_AT:
                time.sleep(FAULT_SECONDS)
            elif calls[0] == FAULT_AT:
                if FAULT == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif FAULT == "stop":
                    os.kill(os.getpid(), signal.SIGSTOP)
                elif FAULT == "stall":
                    time.sleep(3600)
                elif FAULT in ("term", "usr1"):
                    os.kill(os.getpid(), signal.SIGTERM if FAULT == "term" else signal.SIGUSR1)
                elif FAULT == "raise":
                    raise ValueError("injected failure for the test")
        return step(*a, **k)

    return wrapped


def slow_predict_make(*args, **kwargs):
    predict = real_predict(*args, **kwargs)

    def wrapped(*a, **k):
        comm = world()
        if comm.world_ranks[comm.rank] in FAULT_RANKS:
            time.sleep(FAULT_SECONDS * len(a[0]))
        return predict(*a, **k)

    return wrapped


def slow_save(*args, **kwargs):
    time.sleep(SAVE_DELAY)
    return real_save(*args, **kwargs)


trainer.make_train_step = faulty_make
if FAULT == "slow_validation":
    trainer.make_predict_step = slow_predict_make
if SAVE_DELAY:
    checkpoint.save = slow_save
sys.exit(main(sys.argv[1:]))
