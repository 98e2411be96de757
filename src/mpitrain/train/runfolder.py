"""Writing the run folder (rank 0 only): checking, locking and clearing it before training,
and the files whose writers live here (the model, the history, elastic events).

Which names a run folder holds, and who writes each, is `mpitrain.runfiles`: the one list
that ``--overwrite`` clears (`prepare`). Every file is written to a temporary name and
renamed, so an interrupted save never leaves a half-written file under a real name.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from mpitrain import runfiles
from mpitrain.atomic import atomic_path, write_atomic
from mpitrain.engine.loop import event  # noqa: F401 - events.jsonl lines have one maker
from mpitrain.errors import UserError


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def prepare(out: str | None, overwrite: bool, resume: bool = False, check_only: bool = False) -> Path:
    """Check, create and lock the run folder before any training starts (rank 0).

    The lock (`runlock`) is held until `runlock.release_all()`, which also removes the
    folder again if this call created it and nothing was written into it. `check_only`:
    the same checks (`mpitrain train -n N` before it starts mpiexec), then let go and leave
    nothing behind, so the checks change nothing on disk (`--overwrite` deletes nothing yet).
    `overwrite` (not resuming): every name of `runfiles` in the folder is removed, and
    nothing else (`runfiles.remove_all`).
    """
    from mpitrain import outdir
    from mpitrain.train import runlock

    path = Path(out) if out else default_run_dir()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} exists and is not a folder")
    created = outdir.make_dirs(path, "--out")
    try:
        lock = runlock.acquire(path, created)
    except BaseException:
        outdir.remove_empty(created)
        raise
    try:
        if not overwrite:
            outdir.check_new_or_empty(
                path, "--out", "pass --overwrite or choose another folder", ignore=(runfiles.LOCK,)
            )
        try:
            probe = path / runfiles.WRITE_PROBE
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"--out {path} is not writable: {e.strerror or e}") from None
        if overwrite and not resume and not check_only:
            # All of the old run: an export, tb/ or val_predictions.csv left beside the new
            # model.keras would pass for this run's (old checkpoints for a later --resume's).
            runfiles.remove_all(path)
    except BaseException:
        lock.release()
        raise
    if check_only:
        lock.release()
    return path


def resume_folder(out: str | None, check_only: bool = False) -> Path:
    """The run folder `--resume` continues, locked (rank 0); `check_only`: then let go."""
    from mpitrain.train import runlock

    if not out:
        raise UserError("--resume needs --out RUNDIR: the run folder to continue")
    path = Path(out)
    if not path.exists():
        raise UserError(f"--resume: run folder {path} does not exist")
    if not path.is_dir():
        raise UserError(f"--resume: {path} is not a folder")
    lock = runlock.acquire(path)
    if check_only:
        lock.release()
    return path


def append_event(run_dir: Path, line: dict) -> None:
    """--elastic: one JSON line per lost rank (the ranks) or host (the launcher)."""
    import json

    with open(Path(run_dir) / runfiles.EVENTS, "a") as f:
        f.write(json.dumps(line) + "\n")


def write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    if history:
        # Every column of any row (a run resumed from an older version may add columns).
        names = list(dict.fromkeys(k for row in history for k in row))
        writer = csv.DictWriter(buf, fieldnames=names, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in history)
    write_atomic(path, buf.getvalue())


def save_model(path: Path, model) -> None:
    """Save `model` computing in float32, whatever precision it was trained in: the weights
    are float32 anyway, and a model.keras loaded anywhere (an fp32 process, plain Keras)
    then computes in float32 unless asked otherwise (evaluate/predict --precision)."""
    from mpitrain.evaluate.modelio import set_model_precision

    policies = [(layer, layer.dtype_policy) for layer in model._flatten_layers(include_self=True)]
    set_model_precision(model, "fp32")
    try:
        with atomic_path(path) as tmp:  # keeps the .keras suffix Keras wants
            model.save(tmp)
    finally:
        for layer, policy in policies:  # the caller's model is left as it was
            layer.dtype_policy = policy
