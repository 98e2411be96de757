"""Put on PYTHONPATH to slow or break the real `mpitrain` however it is started (a
launcher, mpiexec, Slurm, a job script): every Python process of the job imports this.

SLOW_STEP=S      every training step of every rank first sleeps S seconds (a slower
                 machine), so a test can signal a job that is still training; the weights
                 are those of an unslowed run.
FAULT=KIND       one fault, on the rank(s) FAULT_RANK (default 1, comma-separated), in
FAULT_PHASE      start (as the rank builds its model), step (its FAULT_AT-th training
                 step, counted over the whole run), validation (its FAULT_AT-th validation
                 batch), checkpoint (inside its FAULT_AT-th checkpoint write, half of it
                 written) or final (as it saves the final model).
FAULT_MARK=FILE  a line is appended to FILE when the fault strikes.
KIND: kill (SIGKILL), stop (SIGSTOP, never continued), pause (SIGSTOP, continued after
FAULT_SECONDS by a helper process), term / usr1 (a stop request to itself), raise (a
Python exception: a bug).

Only `mpitrain.engine.loop`, `.engine.checkpoint` and `.train.runfolder` are patched, as they are
imported: nothing is imported early, so the launcher stays light. The count of steps is
per process: a resumed run counts from its resume.
"""

import importlib.machinery
import os
import signal
import sys
import time

DELAY = float(os.environ.get("SLOW_STEP") or 0)
FAULT = os.environ.get("FAULT")
PHASE = os.environ.get("FAULT_PHASE", "step")
AT = int(os.environ.get("FAULT_AT", "1"))
RANKS = {int(r) for r in os.environ.get("FAULT_RANK", "1").split(",")}
_count = {"step": 0, "validation": 0, "checkpoint": 0}


def _rank() -> bool:
    """Only the ranks are broken, never the launcher that started them (it imports some of
    the same modules): a rank is a process that mpiexec or srun started."""
    return "OMPI_COMM_WORLD_RANK" in os.environ or "PMIX_RANK" in os.environ


def _due(phase: str) -> bool:
    """Whether the fault strikes now: its phase, its count and one of its ranks."""
    if FAULT is None or phase != PHASE or not _rank():
        return False
    if phase in _count:
        _count[phase] += 1
        if _count[phase] != AT:
            return False
    from mpitrain.parallel.runscript import env_rank

    return env_rank() in RANKS  # the rank the launcher gave it (no elastic renumbering here)


def _strike(phase: str) -> None:
    mark = os.environ.get("FAULT_MARK")
    if mark:  # for the campaign: the fault did strike (a kill leaves no other trace of it)
        with open(mark, "a") as f:
            f.write(f"{FAULT} {phase} pid {os.getpid()}\n")
    if FAULT == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif FAULT == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif FAULT == "pause":  # a stopped process cannot wake itself: a helper sends SIGCONT
        import subprocess

        seconds = float(os.environ.get("FAULT_SECONDS", "5"))
        subprocess.Popen(["sh", "-c", f"sleep {seconds}; kill -CONT {os.getpid()}"], start_new_session=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    elif FAULT in ("term", "usr1"):
        os.kill(os.getpid(), signal.SIGTERM if FAULT == "term" else signal.SIGUSR1)
    elif FAULT == "raise":
        raise ValueError(f"injected failure in {phase}")


def _fault(phase: str) -> None:
    if _due(phase):
        _strike(phase)


def _patch_loop(module) -> None:
    make, predict = module.make_train_step, module.make_predict_step

    def make_train_step(*args, **kwargs):
        step = make(*args, **kwargs)

        def wrapped(*a, **k):
            if DELAY:
                time.sleep(DELAY)
            _fault("step")
            return step(*a, **k)

        return wrapped

    def make_predict_step(*args, **kwargs):
        step = predict(*args, **kwargs)

        def wrapped(*a, **k):
            _fault("validation")
            return step(*a, **k)

        return wrapped

    module.make_train_step, module.make_predict_step = make_train_step, make_predict_step
    _fault("start")


def _patch_checkpoint(module) -> None:
    real_np = module.np

    class HalfWritten:  # numpy, but savez writes half the file before the fault
        def __getattr__(self, name):
            return getattr(real_np, name)

        @staticmethod
        def savez(f, **arrays):
            real_np.savez(f, **arrays)
            if _due("checkpoint"):
                f.flush()
                f.truncate(max(1, f.tell() // 2))
                _strike("checkpoint")

    if PHASE == "checkpoint":
        module.np = HalfWritten()


def _patch_finish(module) -> None:
    real = module.save_model

    def save_model(*args, **kwargs):
        _fault("final")
        return real(*args, **kwargs)

    module.save_model = save_model


PATCHES = {
    "mpitrain.engine.loop": _patch_loop,
    "mpitrain.engine.checkpoint": _patch_checkpoint,
    "mpitrain.train.runfolder": _patch_finish,
}


class _Patcher:
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        real = spec.loader.exec_module

        def exec_module(module):
            real(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


if DELAY > 0 or FAULT:
    sys.meta_path.insert(0, _Patcher())
