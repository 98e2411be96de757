"""Turn a hang into an error: abort the job when training makes no progress.

The trainer calls `beat()` after every step, validation and checkpoint, and a strategy
calls it while its rank waits for peers that are still working. A daemon thread checks
the time since the last beat; after `timeout` seconds without one (a rank stuck on a dead
network file system, a peer that stopped answering inside a collective) it prints what it
was waiting for and ends the whole MPI job through `on_timeout` (MPI_Abort), so no rank
waits forever. With one process it simply exits.
"""

from __future__ import annotations

import os
import sys
import threading
import time


class Watchdog:
    def __init__(self, timeout: float | None, on_timeout, rank: int = 0):
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.rank = rank
        self.what = "starting"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self.timeout and self.timeout > 0:
            self._last = time.monotonic()
            thread = threading.Thread(target=self._run, args=(self.timeout,), name="mpitrain-watchdog", daemon=True)
            self._thread = thread
            thread.start()
        return self

    def beat(self, what: str = "") -> None:
        self._last = time.monotonic()
        if what:
            self.what = what

    def stop(self) -> None:
        """The thread is gone when this returns (it wakes at once to see the stop)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _run(self, timeout: float) -> None:
        period = min(5.0, timeout / 4)
        while not self._stop.wait(period):
            idle = time.monotonic() - self._last
            if idle > timeout:
                print(
                    f"mpitrain: error on rank {self.rank}: no progress for {idle:.0f} s "
                    f"(last: {self.what}); a rank or the network is stuck, stopping the job "
                    f"(--timeout {timeout:g})",
                    file=sys.stderr,
                    flush=True,
                )
                killer = threading.Timer(10.0, os._exit, args=(3,))  # if the abort itself hangs
                killer.daemon = True
                killer.start()
                self.on_timeout()
                os._exit(3)
