"""mpiexec's stdout to ours, with the ranks' marker lines (parallel/wire.py) taken out."""

from __future__ import annotations

import os
import shutil
import sys

from mpitrain.parallel.wire import HOSTS_STATE, parse_progress, parse_state


class StdoutRelay:
    """mpiexec's stdout to ours: progress marker lines are redrawn as a one-line bar
    (`draw`, a terminal) or dropped (a log), every other line passes unchanged. The last
    position seen is kept in `where`."""

    def __init__(self, out, draw: bool, width: int | None = None, lock=None):
        import threading

        self.out, self.draw, self.width = out, draw, width
        self.lock = lock or threading.Lock()
        self.where: str | None = None
        self.states: set[str] = set()  # "started", "contact": how far the job's start got
        self.hosts: list[str] | None = None  # the host of every rank, once they made contact
        self._shown = False

    def feed(self, line: str) -> None:
        state = parse_state(line)
        if state is not None:
            if state.startswith(HOSTS_STATE):
                self.hosts = state[len(HOSTS_STATE) :].split(",")
            else:
                self.states.add(state)
            return
        marker = parse_progress(line)
        with self.lock:
            if marker is None:
                self._write(self.out, line, clear=True)
                return
            where, text = marker
            self.where = where or self.where
            if not self.draw:
                return
            if text:
                width = self.width or shutil.get_terminal_size().columns
                self._write(self.out, "\r" + text[: max(10, width - 1)] + "\x1b[K", clear=False)
                self._shown = True
            else:
                self._clear()

    def write_other(self, stream, text: str) -> None:
        """`text` for another stream on the same terminal (stderr): the bar goes first."""
        with self.lock:
            self._write(stream, text, clear=True)

    def clear(self) -> None:
        with self.lock:
            self._clear()

    def _clear(self) -> None:
        if self._shown:
            self._shown = False
            self._write(self.out, "\r\x1b[K", clear=False)

    def _write(self, stream, text: str, clear: bool) -> None:
        if clear:
            self._clear()
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # our terminal is gone: the job goes on regardless
            pass


def want_bar() -> bool:
    tty = os.environ.get("MPITRAIN_TTY")
    if tty in ("0", "1"):
        return tty == "1"
    return sys.stdout.isatty()
