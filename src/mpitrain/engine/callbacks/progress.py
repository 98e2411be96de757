"""A one-line progress bar for rank 0, Keras-style, that behaves in logs.

Where it goes depends on how the process was started:

* one process on a terminal: redrawn in place with a carriage return, at most 10 times a
  second; to a file or pipe: nothing during the epoch (the epoch summary line says it all);
* under `mpitrain train -n N` (MPITRAIN_LAUNCHER=1): Open MPI forwards a rank's output by
  whole lines, so a carriage-return bar would never show. Rank 0 writes each redraw as a
  complete marker line instead, and the launcher redraws it as a bar on its terminal, or
  drops it when its output is a log;
* under a plain `mpiexec`: the ranks cannot tell whether anyone watches (Open MPI gives
  them a pseudo-terminal even when mpiexec's output goes to a file), so no bar unless
  MPITRAIN_TTY=1; then rank 0 draws it on the terminal it was started from (/dev/tty), or,
  without one, writes a plain progress line every few seconds.

MPITRAIN_TTY=0 turns the bar off, MPITRAIN_TTY=1 on, wherever the output goes.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from mpitrain.engine.callbacks.base import Callback

LINES_EVERY = 5.0  # seconds between plain progress lines (no terminal to redraw on)

_last: tuple[str, int, int] | None = None  # (prefix, done, total) of the newest update
_active: Progress | None = None
_tty = None  # /dev/tty, opened once


def last_position() -> str | None:
    """Where training was at its newest update ("epoch 2/5, step 17/45"), on any rank."""
    return None if _last is None else _where(*_last)


def clear_active() -> None:
    """Erase a bar left on the terminal (before a message, e.g. after Ctrl-C)."""
    if _active is not None:
        _active.close()


def _where(prefix: str, done: int, total: int) -> str:
    return f"{prefix.strip()}, step {done}/{total}" if prefix.strip() else f"step {done}/{total}"


def _open_tty():
    """The terminal this process was started from, if it may write there (else None)."""
    global _tty
    if _tty is None:
        try:
            import termios

            f = open("/dev/tty", "w")
            if termios.tcgetattr(f.fileno())[3] & termios.TOSTOP:
                f.close()  # a background write would stop the process (SIGTTOU)
                f = False
        except Exception:  # noqa: BLE001 - no terminal (OSError), no termios: no bar there
            f = False
        _tty = f
    return _tty or None


def mode(stream=None) -> str | None:
    """ "redraw" (carriage return), "marker" (lines for the launcher), "lines" (a plain
    line now and then) or None (silent)."""
    return _choose(stream)[0]


def _choose(stream=None):
    """(mode, where to write)."""
    stream = stream or sys.stdout
    tty = os.environ.get("MPITRAIN_TTY")
    if tty == "0":
        return None, stream
    from mpitrain.parallel.wire import under_launcher

    if under_launcher():
        return "marker", stream
    from mpitrain.parallel.comm import launched_by_mpi

    if launched_by_mpi():
        if tty != "1":
            return None, stream
        terminal = _open_tty()
        return ("redraw", terminal) if terminal is not None else ("lines", stream)
    if tty == "1" or (hasattr(stream, "isatty") and stream.isatty()):
        return "redraw", stream
    return None, stream


def interactive(stream=None) -> bool:
    return mode(stream) is not None


class Progress:
    def __init__(self, total: int, prefix: str = "", enabled: bool = True, stream=None, width: int = 24):
        self.total = max(1, total)
        self.prefix = prefix
        self.mode: str | None
        self.stream: Any
        self.mode, self.stream = _choose(stream) if enabled else (None, stream or sys.stdout)
        self.enabled = self.mode is not None
        self.width = width
        self.start = time.perf_counter()
        self._last = self.start if self.mode == "lines" else 0.0
        self._shown = False
        self._done = 0

    def update(self, done: int, values=None, **named: float) -> None:
        """Step `done` of the total. The numbers shown are `named`, or what the callable
        `values()` returns, called only when the bar is drawn (fetching them may cost)."""
        global _last, _active
        _last = (self.prefix, done, self.total)
        self._done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        every = LINES_EVERY if self.mode == "lines" else 0.1
        if now - self._last < every and (done < self.total or self.mode == "lines"):
            return
        self._last = now
        filled = int(self.width * done / self.total)
        bar = "=" * max(0, filled - 1) + (">" if 0 < filled < self.width else "=" * (filled > 0))
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        values = {**(values() if values is not None else {}), **named}
        stats = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        line = f"{self.prefix}{done}/{self.total} [{bar:<{self.width}}] {elapsed:.0f}s eta {eta:.0f}s {stats}"
        if self.mode == "marker":
            from mpitrain.parallel.wire import progress_line

            self.stream.write(progress_line(_where(self.prefix, done, self.total), line.rstrip()))
        elif self.mode == "lines":
            self.stream.write(line.rstrip() + "\n")
        else:
            self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self._shown = True
        _active = self

    def close(self) -> None:
        """Erase the bar so the epoch summary line takes its place."""
        global _active
        if _active is self:
            _active = None
        if not self._shown:
            return
        self._shown = False
        if self.mode == "marker":
            from mpitrain.parallel.wire import progress_line

            self.stream.write(progress_line(_where(self.prefix, self._done, self.total), ""))
        elif self.mode == "redraw":
            self.stream.write("\r\x1b[K")
        self.stream.flush()


class ProgressBar(Callback):
    """The engine's output on rank 0, as a callback: the bar during an epoch's steps, then
    the epoch's summary line through `echo` (`engine.epochs.epoch_line`)."""

    def __init__(self, echo=print, bar: bool = True):
        self.echo, self.show_bar = echo, bar
        self.bar = Progress(0, enabled=False)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        e = self.engine
        self.bar.close()
        self.bar = Progress(
            e.steps,
            f"epoch {epoch + 1}/{e.options.epochs} ",
            enabled=self.show_bar and e.comm.rank == 0 and e.sync.trains,
        )

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.bar.update(batch + 1, values=self.engine.running)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.bar.close()
        if self.engine.comm.rank == 0 and logs is not None:
            from mpitrain.engine.epochs import epoch_line

            self.echo(epoch_line(logs, self.engine.options.epochs, self.engine.tag))

    def on_interrupt(self) -> None:
        self.bar.close()
