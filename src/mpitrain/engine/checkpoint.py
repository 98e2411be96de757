"""Checkpoints: everything needed to continue a run exactly, in a format that cannot run code.

A checkpoint is one `.npz` file (a zip of raw numpy arrays, read with allow_pickle=False)
in RUNDIR/checkpoints/, named by epoch and step so that names sort by progress:

    meta            JSON (as uint8 bytes): format, epoch, step, ranks, steps per epoch,
                    strategy, status, config, history so far
    r{R}_{I}        array I of rank R's state (model variables, optimizer variables, and
                    the trainer's counters), exact dtypes; when every rank's state is
                    byte-identical (allreduce) only rank 0's is stored, with meta "shared"
    best            --keep-best only: the float model weights of the best epoch so far
                    (meta "best_epoch"), identical on every rank at an epoch end

Writes are atomic: a temporary file in the same folder, flushed and fsynced, renamed over
the final name, then the folder fsynced, so a kill at any instant leaves every earlier
checkpoint intact. The newest `keep` are kept. Loading walks from the newest to the oldest
and skips (with a warning) any that does not read back completely: zip CRCs catch
truncation and bit rot.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpitrain import runfiles
from mpitrain.atomic import atomic_path

FORMAT = 1
_NAME = re.compile(r"^ckpt-e(\d{5})-s(\d{7})\.npz$")


class CheckpointTooNew(ValueError):
    """Written by a newer mpitrain. Refused, never skipped like a damaged file: falling back
    to an older checkpoint would silently throw away the progress made since."""


@dataclass
class Checkpoint:
    epoch: int  # the epoch to continue in (0-based)
    step: int  # steps of that epoch already done
    ranks: int
    strategy: str
    states: list[list[np.ndarray]]  # one list of arrays per rank (one shared list if "shared")
    shared: bool = False
    # "running": mid-run; "trained": every epoch done but the model not saved yet (resuming
    # validates and saves); "finished": the run folder is complete.
    status: str = "running"
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    path: Path | None = None
    best: np.ndarray | None = None  # --keep-best: flat float32 weights of the best epoch
    best_epoch: int | None = None
    steps: int | None = None  # steps per epoch of the job that wrote it (None: older files)

    def state_of(self, rank: int) -> list[np.ndarray]:
        return self.states[0] if self.shared else self.states[rank]


def folder_of(run_dir: Path) -> Path:
    return Path(run_dir) / runfiles.CHECKPOINTS


def save(run_dir: Path, ckpt: Checkpoint, keep: int = 2) -> Path:
    folder = folder_of(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "epoch": ckpt.epoch,
        "step": ckpt.step,
        "ranks": ckpt.ranks,
        "strategy": ckpt.strategy,
        "status": ckpt.status,
        "shared": ckpt.shared,
        "config": ckpt.config,
        "history": ckpt.history,
        "arrays": [len(s) for s in ckpt.states],
        "best_epoch": ckpt.best_epoch,
        "steps": ckpt.steps,
    }
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    if ckpt.best is not None:
        arrays["best"] = np.asarray(ckpt.best)
    for r, state in enumerate(ckpt.states):
        for i, a in enumerate(state):
            arrays[f"r{r}_{i}"] = np.asarray(a)
    final = folder / f"ckpt-e{ckpt.epoch:05d}-s{ckpt.step:07d}.npz"
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub: a key might be allow_pickle
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    folder = folder_of(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def read(path: Path) -> Checkpoint:
    """Read one checkpoint completely; raises ValueError if it is damaged, CheckpointTooNew
    (a ValueError too) if a newer mpitrain wrote it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format", 0) > FORMAT:
                raise CheckpointTooNew(f"written by a newer mpitrain (format {meta['format']} > {FORMAT})")
            states = [[z[f"r{r}_{i}"] for i in range(n)] for r, n in enumerate(meta["arrays"])]
            best = z["best"] if "best" in z.files else None
    except (OSError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"damaged ({type(e).__name__}: {e})") from None
    return Checkpoint(
        epoch=meta["epoch"],
        step=meta["step"],
        ranks=meta["ranks"],
        strategy=meta["strategy"],
        states=states,
        shared=meta["shared"],
        status=meta["status"],
        config=meta["config"],
        history=meta["history"],
        path=path,
        best=best,
        best_epoch=meta.get("best_epoch"),
        steps=meta.get("steps"),
    )


def mark_finished(run_dir: Path) -> Path | None:
    """Rank 0, after the model is saved: the newest checkpoint's status becomes "finished"."""
    paths = list_checkpoints(run_dir)
    if not paths:
        return None
    ckpt = read(paths[-1])
    ckpt.status = "finished"
    return save(run_dir, ckpt, keep=0)


def read_meta(path: Path) -> dict:
    """Only the meta member of one checkpoint (no model arrays are read); ValueError if unreadable."""
    try:
        with zipfile.ZipFile(path) as z, z.open("meta.npy") as f:
            meta = json.loads(bytes(np.lib.format.read_array(f, allow_pickle=False)).decode())
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise ValueError(f"damaged ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError("damaged (meta is not an object)")
    return meta


def latest_meta(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint whose meta reads, and that meta (None if there is none)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, read_meta(path)
        except ValueError:
            continue
    return None


def saved_config(run_dir: Path) -> dict | None:
    """The config a run was trained with, from its newest checkpoint (cheap: meta only).

    For the `-n N --resume` launcher, which must know e.g. --elastic before any rank starts."""
    found = latest_meta(run_dir)
    return found[1].get("config") if found else None


def describe_position(epoch: int, step: int) -> str:
    """Where a checkpoint continues, for people: "epoch 2, step 10" or "end of epoch 1"."""
    return f"end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}"


def load_latest(run_dir: Path, warn=print) -> Checkpoint | None:
    """The newest checkpoint that reads back completely (None if there is none); a newest
    one written by a newer mpitrain raises CheckpointTooNew."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return read(path)
        except CheckpointTooNew:
            raise
        except ValueError as e:
            warn(f"warning: checkpoint {path.name} is unreadable ({e}); trying the one before")
    return None
