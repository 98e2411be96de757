"""The decoded-image cache: hits, invalidation, corruption, unwritable folders, pruning."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import mpitrain.data.cache as cache
from mpitrain.data.cache import default_cache_dir, load_images_cached
from mpitrain.data.decode import decode_images
from mpitrain.data.scan import scan

REAL_DATA = Path(__file__).resolve().parents[2] / "../shared/data/chest_xray/train"


def _entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "decoded").glob("*.entry"))


def _no_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded although the cache should have hit")

    monkeypatch.setattr(cache, "decode_native", fail)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MPITRAIN_CACHE_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "m"
    monkeypatch.delenv("MPITRAIN_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "x" / "mpitrain"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "mpitrain"


def test_second_call_hits_without_decoding(image_tree, tmp_path, monkeypatch):
    paths = scan(image_tree).paths + [str(tmp_path / "gone.png")]
    x1, ok1, err1, hit1 = load_images_cached(paths, 8, tmp_path / "c")
    assert not hit1 and len(_entries(tmp_path / "c")) == 1
    _no_decoding(monkeypatch)
    x2, ok2, err2, hit2 = load_images_cached(paths, 8, tmp_path / "c")
    assert hit2 and x2.dtype == np.float32 and x2.shape == (6, 8, 8, 1)
    assert np.array_equal(x1, x2) and np.array_equal(ok1, ok2) and err1 == err2
    assert ok2.tolist() == [True] * 5 + [False] and err2[0][0] == paths[-1]
    x3, _, _ = decode_images(paths, 8)
    assert np.array_equal(x3, x2)  # the cache returns exactly what decoding returns


def test_other_size_or_order_is_a_different_entry(image_tree, tmp_path):
    paths = scan(image_tree).paths
    assert not load_images_cached(paths, 8, tmp_path)[3]
    assert not load_images_cached(paths, 9, tmp_path)[3]
    assert not load_images_cached(paths[::-1], 8, tmp_path)[3]
    assert load_images_cached(paths, 8, tmp_path)[3]


def test_changed_file_invalidates(image_tree, tmp_path, write_image):
    paths = scan(image_tree).paths
    x1, *_ = load_images_cached(paths, 8, tmp_path)
    st = os.stat(paths[0])
    write_image(Path(paths[0]), value=77)
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    x2, _, _, hit = load_images_cached(paths, 8, tmp_path)
    assert not hit and not np.array_equal(x1[0], x2[0])
    assert np.allclose(x2[0], 77 / 255)


def test_added_file_invalidates(image_tree, tmp_path, write_image):
    load_images_cached(scan(image_tree).paths, 8, tmp_path)
    write_image(image_tree / "dog" / "new.png")
    paths = scan(image_tree).paths
    x, ok, _, hit = load_images_cached(paths, 8, tmp_path)
    assert not hit and len(x) == 6 and ok.all()
    assert load_images_cached(paths, 8, tmp_path)[3]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_entry_is_a_miss_and_rewritten(image_tree, tmp_path, damage):
    paths = scan(image_tree).paths
    x1, *_ = load_images_cached(paths, 8, tmp_path)
    (entry,) = _entries(tmp_path)
    data = entry.read_bytes()
    entry.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    x2, _, _, hit = load_images_cached(paths, 8, tmp_path)
    assert not hit and np.array_equal(x1, x2)
    assert entry.read_bytes() == data
    assert load_images_cached(paths, 8, tmp_path)[3]


def test_unwritable_cache_dir_still_loads(image_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cache, "_warned", False)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    paths = scan(image_tree).paths
    x, ok, errors, hit = load_images_cached(paths, 8, blocker / "cache")
    assert not hit and ok.all() and x.shape == (5, 8, 8, 1)
    load_images_cached(paths, 8, blocker / "cache")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "cache" in err


def test_nothing_written_beside_the_data(image_tree, tmp_path):
    before = sorted(image_tree.rglob("*"))
    load_images_cached(scan(image_tree).paths, 8, tmp_path / "c")
    assert sorted(image_tree.rglob("*")) == before


def test_concurrent_loads_agree(image_tree, tmp_path):
    paths = scan(image_tree).paths * 20
    results = []

    def run():
        results.append(load_images_cached(paths, 8, tmp_path, threads=1))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(r[0], results[0][0]) for r in results)
    assert len(_entries(tmp_path)) == 1
    assert not list((tmp_path / "decoded").glob(".tmp-*"))


def test_prune_removes_old_and_oversized_entries(image_tree, tmp_path, monkeypatch):
    paths = scan(image_tree).paths
    for size in (4, 5, 6):
        load_images_cached(paths, size, tmp_path)
    old, mid, new = _entries_by_size(tmp_path)
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))
    os.utime(mid, (time.time() - 60, time.time() - 60))
    stale_tmp = tmp_path / "decoded" / ".tmp-crashed.entry"
    stale_tmp.write_bytes(b"x")
    os.utime(stale_tmp, (month_ago, month_ago))
    monkeypatch.setattr(cache, "MAX_BYTES", new.stat().st_size + 10)
    load_images_cached(paths, 7, tmp_path)  # a write triggers pruning
    left = _entries(tmp_path)
    assert len(left) == 1 and not old.exists() and not mid.exists() and not stale_tmp.exists()


def _entries_by_size(tmp_path: Path) -> list[Path]:
    return sorted(_entries(tmp_path), key=lambda p: p.stat().st_size)


@pytest.mark.realdata
def test_real_chest_xrays_cold_then_cached(tmp_path):
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA.resolve()} (../shared/data/chest_xray)")
    index = scan(REAL_DATA)
    assert index.classes == ["NORMAL", "PNEUMONIA"]
    assert index.counts() == {"NORMAL": 1341, "PNEUMONIA": 3875}
    x, ok, errors, hit = load_images_cached(index.paths, 50, tmp_path / "cache")
    assert not hit and ok.all() and errors == [] and x.shape == (5216, 50, 50, 1)
    assert 0.0 <= x.min() and x.max() <= 1.0 and 0.2 < x.mean() < 0.8
    x2, _, _, hit2 = load_images_cached(index.paths, 50, tmp_path / "cache")
    assert hit2 and np.array_equal(x, x2)


def test_same_size_rewrite_with_a_new_mtime_invalidates(image_tree, tmp_path, write_image):
    # A BMP of a given size always has the same length: only the modification time (and
    # the content) tell the rewritten file from the cached one; the inode stays the same.
    path = image_tree / "dog" / "b.bmp"
    paths = scan(image_tree).paths
    at = paths.index(str(path))
    x1, *_ = load_images_cached(paths, 8, tmp_path)
    st = os.stat(path)
    write_image(path, value=77)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    st2 = os.stat(path)
    assert (st2.st_size, st2.st_ino, st2.st_mode) == (st.st_size, st.st_ino, st.st_mode)
    x2, _, _, hit = load_images_cached(paths, 8, tmp_path)
    assert not hit
    assert np.allclose(x2[at], 77 / 255) and np.allclose(x1[at], 250 / 255)


def test_16bit_entry_hit_equals_the_decode(tmp_path, write_image):
    from mpitrain.data.cache import load_images_native
    from mpitrain.data.decode import decode_native

    ramp = np.linspace(0, 65535, 16 * 16).astype(np.uint16).reshape(16, 16)
    paths = [
        str(write_image(tmp_path / "d" / "a16.png", ramp)),
        str(write_image(tmp_path / "d" / "b8.png", value=51)),
    ]  # 8-bit beside 16-bit
    arr0, max0, ok0, _ = decode_native(paths, 16)
    assert arr0.dtype == np.uint16 and max0 == 65535.0 and ok0.all()
    for expect_hit in (False, True):
        arr, max_value, ok, errors, hit = load_images_native(paths, 16, tmp_path / "c")
        assert hit == expect_hit
        assert arr.dtype == np.uint16 and max_value == 65535.0
        assert np.array_equal(arr, arr0) and ok.all() and errors == []
        x, _, _, _ = load_images_cached(paths, 16, tmp_path / "c")
        assert np.array_equal(x, decode_images(paths, 16)[0])
        assert x.max() == 1.0 and x[1].max() == np.float32(51) / np.float32(255)


def test_a_subset_takes_its_rows_from_the_entry_of_its_whole_list(image_tree, tmp_path, write_image, monkeypatch):
    # The whole folder as `mpitrain data` decodes it: with a 16-bit file and an unreadable one.
    ramp = np.linspace(0, 65535, 16 * 16).astype(np.uint16).reshape(16, 16)
    write_image(image_tree / "dog" / "c16.png", ramp)
    (image_tree / "cat" / "bad.png").write_bytes(b"not a png")
    whole = scan(image_tree).paths
    subset = [p for p in whole if not p.endswith("c16.png")][::-1]  # another order, 8-bit files only
    assert any(p.endswith("bad.png") for p in subset)
    load_images_cached(whole, 8, tmp_path / "c")
    entries = _entries(tmp_path / "c")
    _no_decoding(monkeypatch)
    x, ok, errors, hit = load_images_cached(subset, 8, tmp_path / "c", whole=whole)
    assert hit and _entries(tmp_path / "c") == entries  # a hit, and no second copy written
    monkeypatch.undo()
    x0, ok0, errors0 = decode_images(subset, 8)
    assert np.array_equal(x, x0) and np.array_equal(ok, ok0) and errors == errors0  # exactly a fresh decode
    # Without the whole list, or with a file it does not hold, the subset is decoded itself.
    assert not load_images_cached(subset[1:], 8, tmp_path / "c")[3]
    assert not load_images_cached(subset + [str(tmp_path / "x.png")], 8, tmp_path / "c", whole=whole)[3]
