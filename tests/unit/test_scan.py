"""Scanning a directory-per-class folder: classes, order, filters, symlinks, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mpitrain.data.scan import IMAGE_EXTENSIONS, scan
from mpitrain.errors import UserError


def test_classes_paths_labels(image_tree):
    index = scan(image_tree)
    assert index.classes == ["cat", "dog"]
    assert index.root == image_tree
    rel = [os.path.relpath(p, image_tree) for p in index.paths]
    assert rel == ["cat/a.png", "cat/b.jpg", "cat/sub/c.png", "dog/a.png", "dog/b.bmp"]
    assert index.labels.dtype == np.int64
    assert index.labels.tolist() == [0, 0, 0, 1, 1]
    assert index.counts() == {"cat": 3, "dog": 2}
    assert len(index) == 5


def test_relative_root_gives_absolute_paths(image_tree, monkeypatch):
    monkeypatch.chdir(image_tree.parent)
    index = scan("data")
    assert all(os.path.isabs(p) for p in index.paths)
    assert index.paths == scan(image_tree).paths


def test_extensions_any_case_and_other_files_ignored(tmp_path, write_image):
    root = tmp_path / "d"
    write_image(root / "a" / "x.PNG")
    write_image(root / "a" / "y.JpEg")
    write_image(root / "b" / "z.TIFF")
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "b" / "noext").write_bytes(b"abc")
    index = scan(root)
    assert [os.path.basename(p) for p in index.paths] == ["x.PNG", "y.JpEg", "z.TIFF"]
    assert ".tif" in IMAGE_EXTENSIONS and ".jpeg" in IMAGE_EXTENSIONS


def test_hidden_files_and_folders_ignored(image_tree, write_image):
    write_image(image_tree / "cat" / ".hidden.png")
    write_image(image_tree / "cat" / ".thumbs" / "t.png")
    write_image(image_tree / ".trash" / "x.png")
    write_image(image_tree / ".trash2" / "y.png")
    index = scan(image_tree)
    assert index.classes == ["cat", "dog"]
    assert not any("/." in p for p in index.paths)


def test_directory_named_like_an_image_is_a_folder(image_tree, write_image):
    write_image(image_tree / "dog" / "x.png" / "inner.png")
    index = scan(image_tree)
    assert index.counts()["dog"] == 3
    assert str(image_tree / "dog" / "x.png") not in index.paths


def test_empty_class_folder_is_not_a_class(image_tree, write_image):
    (image_tree / "empty").mkdir()
    (image_tree / "texts").mkdir()
    (image_tree / "texts" / "a.txt").write_text("x")
    write_image(image_tree / "loose.png")  # files directly in the root belong to no class
    index = scan(image_tree)
    assert index.classes == ["cat", "dog"]
    assert len(index) == 5


@pytest.mark.timeout(20)
def test_symlink_loop_does_not_hang(image_tree):
    os.symlink("..", image_tree / "cat" / "sub" / "loop")
    os.symlink(image_tree / "cat", image_tree / "cat" / "self")
    index = scan(image_tree)
    assert index.counts() == {"cat": 3, "dog": 2}


def test_symlinked_files_and_folders_are_followed(tmp_path, image_tree, write_image):
    outside = tmp_path / "elsewhere"
    write_image(outside / "o1.png")
    os.symlink(outside, image_tree / "dog" / "linked")
    os.symlink(outside / "o1.png", image_tree / "cat" / "link.png")
    os.symlink(tmp_path / "missing.png", image_tree / "cat" / "dangling.png")
    index = scan(image_tree)
    assert index.counts() == {"cat": 5, "dog": 3}  # the dangling link is kept for decode
    assert str(image_tree / "dog" / "linked" / "o1.png") in index.paths


def test_three_classes(tmp_path, write_image):
    for name in ("b", "c", "a"):
        for i in range(2):
            write_image(tmp_path / "d" / name / f"{i}.png")
    index = scan(tmp_path / "d")
    assert index.classes == ["a", "b", "c"]
    assert index.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_missing_root(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        scan(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)


def test_root_is_a_file(tmp_path):
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not a folder"):
        scan(tmp_path / "f.png")


def test_one_class(tmp_path, write_image):
    write_image(tmp_path / "d" / "only" / "a.png")
    (tmp_path / "d" / "other").mkdir()
    with pytest.raises(UserError, match=r"found 1 class folder\(s\) with images in .*need at least 2"):
        scan(tmp_path / "d")


def test_no_images(tmp_path, write_image):
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "d" / "b").mkdir()
    (tmp_path / "d" / "a" / "x.txt").write_text("x")
    write_image(tmp_path / "d" / "loose.png")
    with pytest.raises(UserError, match="no image files"):
        scan(tmp_path / "d")


def test_class_names_must_match(tmp_path, image_tree, write_image):
    val = tmp_path / "val"
    write_image(val / "cat" / "1.png")
    write_image(val / "dog" / "1.png")
    assert scan(val, class_names=["cat", "dog"]).classes == ["cat", "dog"]
    write_image(val / "bird" / "1.png")
    with pytest.raises(UserError, match="unexpected bird") as e:
        scan(val, class_names=["cat", "dog", "fox"])
    assert "missing fox" in str(e.value) and str(val) in str(e.value)


def _tree(root, layout: dict[str, list[str]], write_image) -> None:
    for cls, subs in layout.items():
        for sub in subs:
            write_image(root / cls / sub / "0.png", value=len(sub))


def test_the_parent_of_split_folders_is_refused_naming_the_inner_classes(tmp_path, write_image):
    from mpitrain.data.dataset import make_plan

    root = tmp_path / "chest"
    _tree(root, {"test": ["NORMAL", "PNEUMONIA"], "train": ["NORMAL", "PNEUMONIA"]}, write_image)
    for n in range(3):  # a --val-split needs a few images per class
        write_image(root / "train" / "NORMAL" / f"{n}.png", value=n)
        write_image(root / "test" / "PNEUMONIA" / f"{n}.png", value=n)
    with pytest.raises(UserError, match=r"\(NORMAL, PNEUMONIA\).*--data .*chest/train .*--allow-nested-classes"):
        make_plan(str(root), None, 0.5, 0, nested_ok=False)
    assert make_plan(str(root), None, 0.5, 0, nested_ok=True).classes == ["test", "train"]


def test_patient_or_one_level_folders_are_not_taken_for_nested_classes(tmp_path, write_image):
    from mpitrain.data.scan import nested_classes

    patients = tmp_path / "patients"  # each class its own sub-folders: ordinary data
    _tree(patients, {"NORMAL": ["p1", "p2"], "PNEUMONIA": ["p3", "p4"]}, write_image)
    assert nested_classes(scan(patients)) is None
    one = tmp_path / "one"  # one shared sub-folder name (e.g. "images") is no split
    _tree(one, {"NORMAL": ["images"], "PNEUMONIA": ["images"]}, write_image)
    assert nested_classes(scan(one)) is None
    split = tmp_path / "split"
    _tree(split, {"a": ["x", "y"], "b": ["x", "y"], "c": ["x", "y"]}, write_image)
    assert nested_classes(scan(split)) == ["x", "y"]
