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
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_requested: str | None = None


def requested() -> str | None:
    """The name of the first stop signal this process received ("SIGTERM"), else None."""
    return _requested


def _note(signum, _frame) -> None:
    global _requested
    if _requested is None:
        _requested = signal.Signals(signum).name


def install():
    """Catch SIGTERM and SIGUSR1 from now on (forgetting any earlier request); returns a
    function that puts the previous handlers back."""
    global _requested
    _requested = None
    old = {sig: signal.signal(sig, _note) for sig in SIGNALS}

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore
