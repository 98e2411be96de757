"""Output folders: the one rule for a folder a command fills (`train --out`, `synth --out`),
and tidying up the folders a command created when it fails before writing anything.

* `check_new_or_empty`: the folder must be new or empty (names in `ignore` do not count);
  anything else is refused in one line that says what to do instead.
* `make_dirs` creates a folder and its missing parents and returns what it created, so that
  `remove_empty` can take exactly those away again if they are still empty: a folder that
  existed before, or one that holds anything, is never removed.
"""

from __future__ import annotations

import os
from pathlib import Path

from mpitrain.errors import UserError


def check_new_or_empty(path: Path, flag: str, remedy: str, ignore: tuple[str, ...] = ()) -> None:
    """A UserError unless `path` does not exist yet or is an empty folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder")
    if path.is_dir() and any(entry.name not in ignore for entry in path.iterdir()):
        raise UserError(f"{flag} {path} is not empty; {remedy}")


def missing_dirs(path: Path) -> list[Path]:
    """The folders `make_dirs(path)` would create now, outermost first."""
    missing, p = [], Path(path)
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing[::-1]


def make_dirs(path: Path, flag: str) -> list[Path]:
    """Create `path` and its missing parents; return the folders created, outermost first."""
    path = Path(path)
    created = []
    try:
        for p in missing_dirs(path):
            try:
                p.mkdir()
                created.append(p)
            except FileExistsError:  # made by someone else meanwhile: not ours to remove
                if not p.is_dir():
                    raise
    except OSError as e:
        remove_empty(created)
        raise UserError(f"{flag} {path}: cannot create the folder: {e.strerror or e}") from None
    return created


def remove_empty(created: list[Path]) -> None:
    """Remove the folders `make_dirs` created, innermost first, as long as they are empty."""
    for p in reversed(created):
        try:
            os.rmdir(p)
        except OSError:  # not empty (or gone): keep it and everything above it
            return
