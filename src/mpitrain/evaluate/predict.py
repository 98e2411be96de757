"""`mpitrain predict`: class probabilities for images and folders, one CSV row per image.

Arguments are image files or folders (searched recursively for the image extensions of
`mpitrain.data.scan`, hidden files skipped, sorted). Rows come in argument order, one per
file: a file given again (named and inside a folder given too, or under two names; the same
file by its resolved path) keeps its first row, and one note on stderr says so:

    path, predicted, p_<class 1>, ..., p_<class k>, decision, error

``decision`` is the rule that turned the row's probabilities into ``predicted``, the
same on every row, e.g. ``p_PNEUMONIA >= 0.7322394251823425`` (the model's saved
threshold or ``--threshold``, written exactly) or ``argmax`` (more than two classes, or a
model saved without a threshold), so that a row such as ``predicted=NORMAL`` beside
``p_PNEUMONIA=0.69`` explains itself. A multi-label model (`per_label.py`) writes
``p_<label>`` per label, ``predicted`` = the labels at or above their thresholds joined by
``|`` (empty: none), and the per-label comparisons as ``decision``.

A file that cannot be read or decoded, a path that does not exist and a folder without
images each get a row with an empty prediction and the reason in ``error``; the run goes
on. Exit code: 0 if every image was predicted, 1 if any row has an error, 2 for a usage
error (bad model, bad option). Probabilities are written exactly (the float32 value as a
shortest round-trip decimal), so metrics recomputed from the CSV equal `mpitrain evaluate`.

Predictions use the same code as evaluate (`modelio.predict_probs`, fixed batch shape),
the model's saved decision threshold, or ``--threshold``, in float32 unless ``--precision``
says otherwise (see `modelio.set_model_precision`). One process: under mpiexec only
rank 0 works.
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
from pathlib import Path

import numpy as np

from mpitrain.atomic import atomic_path
from mpitrain.errors import UserError

BLOCK = 32 * 32  # files decoded and predicted at a time (a multiple of modelio.BATCH)


def unique(items: list[tuple[str, str | None]]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """The items less the files met before (by resolved path: a file named and found in a
    folder given too would get two identical rows), and the paths left out."""
    seen: set[str] = set()
    kept, again = [], []
    for path, why in items:
        real = os.path.realpath(path)
        if why is None and real in seen:
            again.append(path)
            continue
        seen.add(real)
        kept.append((path, why))
    return kept, again


def repeat_note(again: list[str]) -> str:
    n = len(again)
    return (
        f"note: {n:,} file(s) given more than once (named and in a folder given, or under two names) "
        f"get one row each, the first: e.g. {again[0]}"
    )


def collect(paths: list[str]) -> list[tuple[str, str | None]]:
    """(path, None) for each image to predict, or (path, reason) for what cannot be."""
    from mpitrain.data.scan import _walk  # the scan rules of training: same files found

    out: list[tuple[str, str | None]] = []
    for given in paths:
        if os.path.isdir(given):
            found: list[tuple[str, str]] = []
            try:
                _walk(given, "", set(), found)
            except UserError as e:
                out.append((given, str(e)))
                continue
            found.sort()
            out += [(full, None) for _, full in found] or [(given, "no image files in this folder")]
        elif os.path.lexists(given):
            out.append((given, None))  # any named file is tried; the decoder says what is wrong
        else:
            out.append((given, "no such file or folder"))
    return out


def decision_rule(classes: list[str], threshold: float | None, positive: int | None) -> str:
    """The CSV's ``decision`` column: how ``predicted`` follows from the ``p_`` columns."""
    if threshold is None or positive is None:
        return "argmax"
    return f"p_{classes[positive]} >= {float(threshold)!r}"  # exact: the comparison modelio.decide makes


def predict_main(
    model: str | list[str],
    paths: list[str],
    csv_path: str | None = None,
    threshold: float | None = None,
    image_size: int | str | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    tta: tuple[int, str | None, int] = (1, None, 0),
) -> int:
    """``tta``: (views, policy or None for the model's, seed) of ``--tta`` (`tta.py`)."""
    from mpitrain.evaluate import ensemble, modelio, per_label
    from mpitrain.parallel.comm import launched_by_mpi, world

    if launched_by_mpi() and world().rank != 0:
        return 0  # one process does the work; more ranks would only write the same file
    info = ensemble.read_info(model, need_threshold=threshold is None)
    modelio.check_image_size(info, image_size)
    multi = per_label.is_multi_label(info)
    if multi:  # a threshold per label; the decision below is the set of labels at or above theirs
        ts, source = per_label.thresholds(info, threshold)
        t = None
    else:
        t, source = modelio.resolve_threshold(info, threshold)
    if csv_path is not None and (Path(csv_path).is_dir() or not Path(csv_path).resolve().parent.is_dir()):
        raise UserError(f"--csv {csv_path}: need a file in an existing folder")
    if tta[0] < 1:
        raise UserError(f"--tta must be 1 (off) or more views, got {tta[0]}")
    items, again = unique(collect(paths))
    if again:
        print(repeat_note(again), file=sys.stderr)
    from mpitrain.runtime import configure_runtime, resolve_precision

    precision = resolve_precision(precision)[0]
    configure_runtime(0, threads, 1, precision)
    net = ensemble.load(info, precision)

    k, pos = len(info.classes), info.positive
    rule = per_label.rule(info.classes, ts) if multi else decision_rule(info.classes, t, pos)
    counts, failed = np.zeros(k, np.int64), 0
    with contextlib.ExitStack() as files:
        stream = sys.stdout
        if csv_path is not None:  # a complete file or none: written aside, renamed at the end
            tmp = files.enter_context(atomic_path(Path(csv_path)))
            stream = files.enter_context(open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape"))
        writer = csv.writer(stream)
        writer.writerow(["path", "predicted"] + [f"p_{c}" for c in info.classes] + ["decision", "error"])
        for a in range(0, len(items), BLOCK):
            block = items[a : a + BLOCK]
            probs, ok, reasons = _predict_block(net, info, [p for p, why in block if why is None], tta)
            j = 0
            for path, why in block:
                if why is None:
                    why = reasons[j] if not ok[j] else None
                    row = probs[j]
                    j += 1
                if why is not None:
                    failed += 1
                    writer.writerow([path, ""] + [""] * k + ["", why])
                    continue
                if multi:
                    called = row.astype(np.float64) >= ts
                    counts += called
                    predicted = "|".join(c for c, yes in zip(info.classes, called) if yes)
                else:
                    c = int(modelio.decide(row[None, :], t, pos)[0])
                    counts[c] += 1
                    predicted = info.classes[c]
                writer.writerow([path, predicted] + [modelio.exact(p) for p in row] + [rule, ""])
    say = (lambda s: print(s)) if csv_path is not None else (lambda s: print(s, file=sys.stderr))
    saved = "chosen for the ensemble" if info.members else "saved with the model"
    given = saved if source == "model" else source
    if multi:
        decision = f"a threshold per label ({given}); images with each label"
    else:
        decision = f"P({info.positive_class}) >= {t:.4f} ({given})" if t is not None else "argmax"
    n_done = len(items) - failed
    say(
        f"predicted {n_done:,} image(s) with {info.label} (decision: {decision}): "
        + ", ".join(f"{c} {n:,}" for c, n in zip(info.classes, counts))
        + (f"; {failed} row(s) with an error (see the error column)" if failed else "")
        + (f"; wrote {csv_path}" if csv_path else "")
        + (f"; test-time augmentation: {tta[0]} views" if tta[0] > 1 else "")
    )
    return 1 if failed else 0


def _predict_block(net, info, files: list[str], tta=(1, None, 0)):
    """(probs [n, k] float32, ok [n], reason per file or None) for one block of files."""
    from mpitrain.data.decode import decode_images
    from mpitrain.evaluate import tta as views

    if not files:
        return np.zeros((0, len(info.classes)), np.float32), np.zeros(0, bool), []
    x, ok, errors = decode_images(files, info.image_size, channels=info.channels)
    why = dict(errors)
    policy = tta[1] or views.default_policy(info)
    probs = views.predict(net, x, files, len(info.classes), tta[0], policy, tta[2])
    return probs, ok, [why.get(f) for f in files]
