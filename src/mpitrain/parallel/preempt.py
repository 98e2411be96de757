"""Stop requests: SIGTERM or SIGUSR1 to a rank asks the whole job to checkpoint and stop.

Batch systems announce the end of a job with a signal: Slurm sends SIGTERM at the time
limit or on preemption (then SIGKILL after KillWait), and `--signal=USR1@120` sends SIGUSR1
120 s before. The handler only notes the request (`requested`); the ranks then agree at a
step boundary, through their strategy's collectives (`parallel/strategies/base.py`,
`stop_agreed`), to write a checkpoint and exit with 0, so `--resume` continues the run.
One rank receiving the signal is enough: the vote carries it to the others.

Handlers are installed by `mpitrain train` on every rank as it starts, in the main thread
(the only one Python delivers signals to), and kept until the process ends; a signal
arriving inside a blocking MPI call is handled when the call returns.

Ctrl-C (SIGINT) still raises KeyboardInterrupt at once, but is also noted (`interrupted`):
landing inside TensorFlow's C++ (tracing a step, converting a tensor) it can surface as
another error (SystemError "bad argument to internal function", a TypeError wrapped by
autograph), which is then the interrupt too, not a crash.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested: str | None = None
_interrupted = False


def requested() -> str | None:
    """The name of the first stop signal this process received ("SIGTERM"), else None."""
    return _requested


def interrupted() -> bool:
    """Whether Ctrl-C (SIGINT) reached this process since `install`."""
    return _interrupted


def _ctrl_c(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt


def _note(signum, _frame) -> None:
    global _requested
    if _requested is None:
        _requested = signal.Signals(signum).name


def install():
    """Catch SIGTERM and SIGUSR1 from now on (forgetting any earlier request), and note
    Ctrl-C where it raises KeyboardInterrupt (Python's default; an ignored SIGINT stays
    ignored); returns a function that puts the previous handlers back."""
    global _requested, _interrupted
    _requested, _interrupted = None, False
    old = {sig: signal.signal(sig, _note) for sig in SIGNALS}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        old[signal.SIGINT] = signal.signal(signal.SIGINT, _ctrl_c)

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore
