"""atomic.atomic_dir: a folder appears complete or not at all, and a failure loses nothing."""

import os

import pytest

from mpitrain.atomic import TMP_PREFIX, atomic_dir


def _fill(folder, text):
    (folder / "sub").mkdir()
    (folder / "sub" / "a.txt").write_text(text)
    (folder / "b.txt").write_text(text)


def _names(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_the_folder_appears_only_when_the_block_ends(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        _fill(tmp, "new")
        assert not target.exists() and tmp.parent == tmp_path and tmp.name.startswith(TMP_PREFIX)
    assert _names(target) == ["b.txt", "sub", "sub/a.txt"] and (target / "b.txt").read_text() == "new"
    assert _names(tmp_path) == ["out", "out/b.txt", "out/sub", "out/sub/a.txt"]  # no temporary left
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # an ordinary folder, not mkdtemp's 0700


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old


def test_an_empty_folder_is_filled_and_a_failure_leaves_it_as_it_was(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        _fill(tmp, "half")
        raise RuntimeError("failed midway")
    assert _names(tmp_path) == ["out"]
    with atomic_dir(target) as tmp:
        _fill(tmp, "new")
    assert (target / "sub" / "a.txt").read_text() == "new"


def test_replace_swaps_a_whole_folder_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    _fill(target, "old")
    (target / "stale.txt").write_text("from the old export")
    with pytest.raises(RuntimeError), atomic_dir(target, replace=True) as tmp:
        _fill(tmp, "new")
        raise RuntimeError("check failed")
    assert (target / "stale.txt").is_file() and (target / "b.txt").read_text() == "old"
    assert _names(tmp_path) == ["out", "out/b.txt", "out/stale.txt", "out/sub", "out/sub/a.txt"]
    with atomic_dir(target, replace=True) as tmp:
        _fill(tmp, "new")
    assert _names(tmp_path) == ["out", "out/b.txt", "out/sub", "out/sub/a.txt"]  # stale file and old copy gone
    assert (target / "b.txt").read_text() == "new"


def test_without_replace_a_non_empty_folder_is_not_touched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        _fill(tmp, "new")
    assert _names(tmp_path) == ["out", "out/keep.txt"]
