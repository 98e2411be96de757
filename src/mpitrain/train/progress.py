"""A one-line progress bar for rank 0, Keras-style, that behaves in logs.

On a terminal it redraws one line with a carriage return at most 10 times a second. When
the output is a file or pipe (CI logs, `mpiexec` without our launcher) it stays silent
during the epoch, and the per-epoch summary line carries the information instead.
`mpitrain train -n N` sets MPITRAIN_TTY=1 for its ranks when its own stdout is a terminal,
since under mpiexec the ranks cannot tell; with a plain mpiexec, export MPITRAIN_TTY=1.
"""

from __future__ import annotations

import os
import sys
import time


def interactive(stream=None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("MPITRAIN_TTY") in ("0", "1"):
        return os.environ["MPITRAIN_TTY"] == "1"
    from mpitrain.dist.comm import launched_by_mpi

    if launched_by_mpi():
        # Open MPI hands its ranks a pseudo-terminal even when mpiexec's own output goes to
        # a log file, so isatty() says nothing here: no bar unless MPITRAIN_TTY=1.
        return False
    return hasattr(stream, "isatty") and stream.isatty()


class Progress:
    def __init__(self, total: int, prefix: str = "", enabled: bool = True, stream=None, width: int = 24):
        self.total = max(1, total)
        self.prefix = prefix
        self.stream = stream or sys.stdout
        self.enabled = enabled and interactive(self.stream)
        self.width = width
        self.start = time.perf_counter()
        self._last = 0.0
        self._shown = False

    def update(self, done: int, **values: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < self.total and now - self._last < 0.1:
            return
        self._last = now
        filled = int(self.width * done / self.total)
        bar = "=" * max(0, filled - 1) + (">" if 0 < filled < self.width else "=" * (filled > 0))
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        stats = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        line = f"{self.prefix}{done}/{self.total} [{bar:<{self.width}}] {elapsed:.0f}s eta {eta:.0f}s {stats}"
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Erase the bar so the epoch summary line takes its place."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
