"""TensorBoard logs of a run (``--tensorboard``): per-epoch scalars in ``RUNDIR/tb``.

Written by rank 0 only. The events are written with TensorFlow's own summary writer and
the metadata of TensorBoard's scalar plugin, which is exactly what ``tf.summary.scalar``
does, but without needing the ``tensorboard`` package to write them (install it to look:
``pip install tensorboard; tensorboard --logdir RUNDIR/tb``).

Either all epochs after training (`write_history`, what `mpitrain train` does) or one
epoch at a time from the training loop (`log_epoch`).

Tags: ``loss/train``, ``loss/validation``, ``accuracy/...``, ``auc/...``, ``lr``,
``images_per_second`` and ``seconds``, one point per epoch (step = epoch number).
"""

from __future__ import annotations

import math
from pathlib import Path

from mpitrain.engine.callbacks.base import Callback

_PAIRS = ("loss", "accuracy", "auc")  # each as <name>/train and <name>/validation
_SINGLE = ("lr", "images_per_second", "seconds")


def _metadata():
    from tensorflow.core.framework import summary_pb2

    # plugin "scalars", content = ScalarPluginData(version=0) serialised = b"" (TensorBoard's own)
    return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


def _value(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def scalars(row: dict) -> dict[str, float]:
    """The tags and values of one history row (undefined values are left out)."""
    out = {}
    for key in _PAIRS:
        for prefix, side in (("", "train"), ("val_", "validation")):
            v = _value(row.get(prefix + key))
            if v is not None:
                out[f"{key}/{side}"] = v
    for key in _SINGLE:
        v = _value(row.get(key))
        if v is not None:
            out[key] = v
    return out


class EpochLog:
    """Append one epoch at a time (usable from a training loop on rank 0)."""

    def __init__(self, logdir: Path):
        from mpitrain.runtime import import_tensorflow

        self.tf = import_tensorflow()
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.writer = self.tf.summary.create_file_writer(str(self.logdir))
        self.meta = _metadata()

    def write(self, row: dict) -> None:
        step = int(row.get("epoch", 0))
        with self.writer.as_default():
            for tag, v in scalars(row).items():
                self.tf.summary.write(tag, self.tf.constant(v, self.tf.float32), step=step, metadata=self.meta)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


_OPEN: dict[Path, EpochLog] = {}


def log_epoch(logdir: Path, row: dict) -> None:
    """Live logging from the training loop (rank 0): one writer per folder, kept open."""
    logdir = Path(logdir)
    if logdir not in _OPEN:
        _OPEN[logdir] = EpochLog(logdir)
    _OPEN[logdir].write(row)


def write_history(logdir: Path, history: list[dict]) -> Path:
    """All epochs at once (after training); replaces the event files of an earlier run.

    Also after live logging (`log_epoch`), so the final logs hold exactly the complete
    history once, even when the run was resumed in several processes.
    """
    logdir = Path(logdir)
    live = _OPEN.pop(logdir, None)
    if live is not None:
        live.close()
    if logdir.is_dir():  # --overwrite: the old run's curves must not mix with the new ones
        for old in logdir.glob("events.out.tfevents.*"):
            old.unlink()
    log = EpochLog(logdir)
    try:
        for row in history:
            log.write(row)
    finally:
        log.close()
    return logdir


class TensorBoard(Callback):
    """Live TensorBoard scalars, one point per epoch, written by rank 0 to `logdir`."""

    def __init__(self, logdir: Path):
        self.logdir = Path(logdir)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.engine.comm.rank == 0 and logs is not None:
            log_epoch(self.logdir, logs)
