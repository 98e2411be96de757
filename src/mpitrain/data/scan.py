"""Find the images of a directory-per-class folder (``ROOT/<class>/**/<image>``).

Rules of `scan`:

* Classes are the immediate sub-folders of ROOT that hold at least one candidate image,
  sorted by name; a class's label is its index in that list.
* Candidates are found recursively under each class folder by extension (see
  `IMAGE_EXTENSIONS`, any letter case, DICOM's ``.dcm``/``.dicom`` included), plus files
  without an extension (or with a numeric one, as UID-named PACS exports have) whose bytes
  carry the DICOM marker (``DICM`` at offset 128: 132 bytes read per such file). Files
  directly in ROOT are not part of any class.
* Names starting with "." (hidden files and folders) are ignored.
* Symlinks are followed; each class keeps a set of the (st_dev, st_ino) of the real
  folders it entered, so a symlink loop is entered once and cannot hang the scan. A
  dangling symlink with an image extension is kept so the decoder can report it.
* Paths are ``os.path.abspath(ROOT)/<class>/<relative path>`` (symlinks not resolved),
  ordered by class, then by relative path: the order is the same on every machine.

Every user mistake is a `UserError` with one line that names the folder.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpitrain.data.dicom import DICOM_EXTENSIONS, has_marker, may_be_dicom_name
from mpitrain.data.findings import positives
from mpitrain.errors import UserError
from mpitrain.targets import is_multi_label

OPENCV_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})  # decode.py: OpenCV
IMAGE_EXTENSIONS = OPENCV_EXTENSIONS | DICOM_EXTENSIONS


@dataclass(frozen=True)
class FileIndex:
    """The images found under ``root``: ``paths[i]`` belongs to ``classes[labels[i]]``.

    From a label file (`labels.read_labels`) ``root`` is the file's folder, ``source`` the
    file, ``patients`` the patient column (if asked for) and ``skipped`` the rows left out.
    A multi-label table gives labels float32 [n, L] instead (`findings.py`: 0/1, NaN
    masked), ``classes`` then being the L label names.
    """

    root: Path
    classes: list[str]
    paths: list[str]
    labels: np.ndarray  # int64, index into classes; multi-label: float32 [n, L]
    patients: list[str | None] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: str | None = None

    @property
    def where(self) -> str:
        """What to call this data in messages: the folder, or the label file."""
        return self.source or str(self.root)

    def counts(self) -> dict[str, int]:
        """Number of images per class, in class order (multi-label: positives per label)."""
        if is_multi_label(self.labels):
            return {name: int(c) for name, c in zip(self.classes, positives(self.labels))}
        per_class = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(c) for name, c in zip(self.classes, per_class)}

    def __len__(self) -> int:
        return len(self.paths)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(folder: str, rel: str, visited: set[tuple[int, int]], out: list[tuple[str, str]]) -> None:
    """Append (relative path, full path) of every candidate image below ``folder``."""
    try:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in visited:
            return  # reached again through a symlink (maybe a loop): already scanned
        visited.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"cannot read folder {folder}: {e.strerror or e}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        sub = f"{rel}/{entry.name}" if rel else entry.name
        try:
            is_dir = entry.is_dir()  # follows symlinks
            is_file = not is_dir and entry.is_file()
            dangling = not is_dir and not is_file and entry.is_symlink() and not os.path.exists(entry.path)
        except OSError:
            is_dir, is_file, dangling = False, True, False  # let the decoder report it
        if is_dir:
            _walk(entry.path, sub, visited, out)
        elif (
            (is_file or dangling)
            and _is_image_name(entry.name)
            or is_file
            and may_be_dicom_name(entry.name)
            and has_marker(entry.path)
        ):
            out.append((sub, entry.path))


def _check_root(root: str) -> None:
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise UserError(f"data folder {root} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot access data folder {root}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"data path {root} is not a folder (need one sub-folder per class)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"data folder {root} is not readable (check its permissions)")


def check_classes(where: str, classes: list[str], class_names: list[str] | None, what: str = "classes") -> None:
    """`UserError` unless ``classes`` (found in ``where``) equal ``class_names`` (if given).
    ``what``: what they are, in the message (a multi-label table's "label columns")."""
    if class_names is not None and list(class_names) != classes:
        missing = [c for c in class_names if c not in classes]
        extra = [c for c in classes if c not in class_names]
        detail = (
            "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unexpected {', '.join(extra)}" if extra else "",
                )
                if part
            )
            or "different order"
        )
        raise UserError(f"{what} in {where} do not match the training {what} ({', '.join(class_names)}): {detail}")


def scan(root, class_names: list[str] | None = None) -> FileIndex:
    """Index the images under ``root``; see the module docstring for the rules.

    ``class_names`` (e.g. the training classes when scanning a validation folder) must
    equal the classes found here, else `UserError` names the missing and extra ones.
    """
    root_str = os.path.abspath(os.path.expanduser(os.fspath(root)))
    _check_root(root_str)
    try:
        with os.scandir(root_str) as it:
            subdirs = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError as e:
        raise UserError(f"cannot read data folder {root_str}: {e.strerror or e}") from None

    classes: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    for name in subdirs:
        found: list[tuple[str, str]] = []
        _walk(os.path.join(root_str, name), "", set(), found)
        if not found:
            continue
        found.sort()
        label = len(classes)
        classes.append(name)
        paths.extend(full for _, full in found)
        labels.extend([label] * len(found))

    if not paths:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(
            f"no image files ({exts}, or DICOM without an extension) found in class sub-folders of {root_str}"
        )
    if len(classes) < 2:
        raise UserError(
            f"found {len(classes)} class folder(s) with images in {root_str}; "
            "need at least 2 (one sub-folder per class)"
        )
    check_classes(root_str, classes, class_names)
    return FileIndex(Path(root_str), classes, paths, np.asarray(labels, dtype=np.int64))


def nested_classes(index: FileIndex) -> list[str] | None:
    """The sub-folder names shared by every class folder, when each class holds the same 2 or
    more sub-folders with images (``chest_xray/{train,test}/{NORMAL,PNEUMONIA}`` scanned at
    ``chest_xray``: the "classes" are splits, the real classes one level down); else None.
    Patient or date folders differ from class to class, so they never look like this."""
    root = str(index.root) + os.sep
    subs: list[set[str]] = [set() for _ in index.classes]
    for path, label in zip(index.paths, index.labels):
        parts = path[len(root) :].split(os.sep) if path.startswith(root) else []
        if len(parts) > 2:  # <class>/<sub-folder>/.../<image>
            subs[int(label)].add(parts[1])
    first = subs[0]
    if len(first) < 2 or any(s != first for s in subs[1:]):
        return None
    return sorted(first)


def check_not_nested(index: FileIndex, data_arg: str, option: str = "--allow-nested-classes") -> None:
    """`UserError` when ``index`` looks like the parent of split folders (`nested_classes`):
    training on it would learn which folder an image came from. ``data_arg``: --data as given."""
    inner = nested_classes(index)
    if inner is None:
        return
    pick = next((c for c in index.classes if c.lower() in ("train", "training")), index.classes[0])
    suggest = os.path.join(data_arg.rstrip("/" + os.sep) or data_arg, pick)
    raise UserError(
        f"every class folder of {data_arg} ({', '.join(index.classes)}) holds the same sub-folders "
        f"({', '.join(inner)}): is it the parent of the splits? Use --data {suggest} "
        f"(or {option} if these really are the classes)"
    )
