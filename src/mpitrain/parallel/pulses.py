"""Progress pulses: a rank waiting for its peers can tell working peers from stuck ones.

Some ranks wait for others that are still working: a master-worker master (it does not
train) and a worker that finished its round early wait for the slowest worker; workers
wait while the master validates alone. Inside a blocking collective such a rank's watchdog
cannot tell a slow peer from a stuck one, and a healthy job is aborted after --timeout.

So the ranks post one nonblocking barrier (a "pulse") per unit of work - a training step,
a validation batch - the same number on every rank, in the same order (it is a
collective), and nobody waits for it then. A rank that has to wait polls its pulses
instead: each one that completes means every rank has finished that unit, and is reported
to `progress` (the watchdog's beat). A rank that stops (a stuck file system, SIGSTOP)
completes no more pulses, so the others' watchdogs still fire.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm, Request


class Pulses:
    def __init__(self, comm: Comm, progress: Callable[[str], None]) -> None:
        self.comm = comm
        self.progress = progress
        self._pending: list[tuple[str, Request]] = []  # (label, request), oldest first

    def __len__(self) -> int:
        return len(self._pending)

    def post(self, label: str) -> None:
        """Collective, nonblocking: this rank has finished the unit of work `label`."""
        self._pending.append((label, self.comm.ibarrier()))
        self.poll()

    def poll(self) -> bool:
        """Retire the pulses that completed, oldest first; True if any did (never waits)."""
        done = None
        while self._pending and self.comm.test(self._pending[0][1]):
            done = self._pending.pop(0)[0]
        if done is not None:
            self.progress(f"every rank has finished {done}")
        return done is not None

    def wait(self) -> None:
        """Until every rank has finished every unit posted so far."""
        pause = 0.0002
        while self._pending:
            if self.poll():
                pause = 0.0002
            else:
                # Sleep rather than spin: an idle master must not take a core from the
                # workers it waits for (ranks often share a node).
                time.sleep(pause)
                pause = min(2 * pause, 0.01)
