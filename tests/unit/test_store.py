"""--store disk (data/store.py): a host's ranks write one memory-mapped store together, each
rank reads its own rows from it, the same rows as the in-memory path; torn or half-written
stores are never trusted; a full disk or an unwritable cache folder is one line, exit 2."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from mpitrain.config import TrainConfig
from mpitrain.data import store
from mpitrain.data.dataset import load_shard, make_plan
from mpitrain.data.decode import decode_native
from mpitrain.errors import AgreedError, QuietExit, UserError
from mpitrain.parallel.comm import SingleComm


class ThreadComm(SingleComm):
    """Rank `rank` of `size` threads; `hosts[r]` names rank r's host (node_allgather_obj)."""

    def __init__(self, rank: int, hosts: list[int], shared: dict):
        super().__init__()
        self.rank, self.size, self.hosts, self.shared = rank, len(hosts), hosts, shared

    def allgather_obj(self, obj):
        box, barrier = self.shared["box"], self.shared["barrier"]
        box[self.rank] = obj
        barrier.wait()
        got = list(box)
        barrier.wait()  # nobody overwrites the box before everyone has read it
        return got

    def node_allgather_obj(self, obj):
        got = self.allgather_obj(obj)
        return [o for r, o in enumerate(got) if self.hosts[r] == self.hosts[self.rank]]

    def bcast_obj(self, obj, root=0):
        return self.allgather_obj(obj)[root]


def _as_ranks(hosts: list[int], work):
    """`work(comm)` on one thread per rank; returns each rank's result (re-raises the error of the lowest rank)."""
    shared = {"box": [None] * len(hosts), "barrier": threading.Barrier(len(hosts), timeout=60)}
    results: list = [None] * len(hosts)
    errors: list = []

    def run(rank):
        try:
            results[rank] = work(ThreadComm(rank, hosts, shared))
        except BaseException as e:  # noqa: BLE001 - handed to the test below
            errors.append((rank, e))
            if not isinstance(e, (AgreedError, QuietExit)):  # agreed errors stop every rank by themselves
                shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(hosts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise min(errors, key=lambda re: re[0])[1]
    return results


@pytest.fixture
def data(tmp_path, write_image):
    """Two classes of 8-bit images, one file that cannot be decoded."""
    root = tmp_path / "data"
    for c, base in (("cat", 10), ("dog", 120)):
        for i in range(11):
            write_image(root / c / f"{i:02d}.png", value=base + 7 * i)
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    return root


def _rows(x) -> np.ndarray:
    return np.stack([x[i] for i in range(len(x))]) if len(x) else np.zeros((0,))


def test_a_hosts_ranks_write_one_store_and_read_the_in_memory_rows(data, tmp_path):
    plan = make_plan(str(data), None, 0.25, 1)
    # Ranks 0, 1 on host A, rank 2 on host B: each host its own cache folder, as by default.
    hosts = [0, 0, 1]

    def work(comm):
        cache = tmp_path / f"cache-{comm.hosts[comm.rank]}"
        stores = store.open_stores(comm, plan, 16, 1, str(cache))
        return stores, stores.shard(plan, 3, (comm.rank, 3), (comm.rank, 3))

    got = _as_ranks(hosts, work)
    assert [s.train.built for s, _ in got] == [True, True, True]
    files = sorted(p.name for p in tmp_path.glob("cache-*/store/*"))
    assert len(files) == 2 and files[0] == files[1]  # one store per host, same key, no temporary left
    whole, _, ok, errors = decode_native(plan.train_source, 16)
    stored = np.load(got[0][0].train.path, mmap_mode="r")  # a plain .npy as far as numpy is concerned
    assert np.array_equal(stored[ok], whole[ok]) and stored.dtype == np.uint8
    for rank, (_, shard) in enumerate(got):
        mine = load_shard(plan, 16, 3, (rank, 3), (rank, 3), str(tmp_path / "mem"))
        for split in ("train", "val"):
            x, y = getattr(shard, f"{split}_x"), getattr(shard, f"{split}_y")
            assert isinstance(x, store.Rows)  # read through the map, not copied
            assert np.array_equal(_rows(x), getattr(mine, f"{split}_x"))
            assert np.array_equal(y, getattr(mine, f"{split}_y"))
        assert np.array_equal(shard.val_index, mine.val_index)
        assert shard.errors == mine.errors and shard.train_max == mine.train_max == 255.0
    assert sum(len(s.errors) for _, s in got) == 1 and errors[0][0].endswith("broken.png")
    # A second job finds both stores: nothing decoded.
    again = _as_ranks(hosts, work)
    assert [s.train.built for s, _ in again] == [False, False, False]
    assert again[1][1].cache_hits == 2


def test_rows_index_like_an_array():
    base = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2)
    rows = store.Rows(base, np.array([4, 1, 3]))
    assert len(rows) == 3 and rows.shape == (3, 2, 2) and rows.dtype == np.uint8 and rows.ndim == 3
    assert np.array_equal(rows[np.array([2, 0])], base[[3, 4]])
    assert np.array_equal(rows[1:], base[[1, 3]]) and np.array_equal(rows[0], base[4])
    assert not np.shares_memory(rows[0], base)


def test_a_16bit_file_makes_the_host_start_over_in_uint16(tmp_path, write_image):
    ramp = np.linspace(0, 65535, 16 * 16).astype(np.uint16).reshape(16, 16)
    for i in range(4):
        write_image(tmp_path / "d" / "a" / f"{i}.png", value=30 + i)
    write_image(tmp_path / "d" / "b" / "wide.png", ramp)
    write_image(tmp_path / "d" / "b" / "narrow.png", value=51)
    plan = make_plan(str(tmp_path / "d"), None, 0.3, 0)
    got = _as_ranks([0, 0], lambda comm: store.open_stores(comm, plan, 16, 1, str(tmp_path / "c")))
    s = got[0].train
    whole, max_value, ok, _ = decode_native(plan.train_source, 16)
    assert s.rows.dtype == np.uint16 and s.max_value == max_value == 65535.0
    assert np.array_equal(np.asarray(s.rows), whole) and s.ok.all()


def test_a_half_written_or_torn_store_is_never_trusted(data, tmp_path):
    plan = make_plan(str(data), None, 0.25, 1)
    cache = tmp_path / "c"
    first = store.open_stores(SingleComm(), plan, 16, 1, str(cache)).train
    # A writer killed before its rename leaves a temporary file: a later run ignores it.
    folder = first.path.parent
    (folder / f".tmp-dead-{first.path.name}").write_bytes(b"\0" * 100)
    good = first.path.read_bytes()
    for damage in (good[:-5], good[: len(good) // 2], b""):  # trailer cut, rows cut, empty
        first.path.write_bytes(damage)
        again = store.open_stores(SingleComm(), plan, 16, 1, str(cache)).train
        assert again.built and again.path.read_bytes() == good
    meta = json.loads(good[int(np.load(first.path, mmap_mode="r").offset) + first.rows.nbytes :])
    assert meta["n"] == len(plan.train_source) and [p for _, p, _ in meta["failed"]] == [str(data / "dog/broken.png")]


def test_auto_takes_the_disk_only_when_memory_would_not_hold_the_rows():
    size = 100 * 100
    assert not store.disk_wanted(1000, 100, 1, available=10 * 1000 * size)
    assert store.disk_wanted(1000, 100, 1, available=1000 * size)  # more than half of it
    assert store.disk_wanted(1000, 100, 3, available=4 * 1000 * size)  # colour: three times the bytes
    assert not store.disk_wanted(10**9, 100, 1, available=None)  # unknown: as before, in memory


def test_disk_is_refused_where_rows_stay_in_memory():
    with pytest.raises(UserError, match="--data-on-root"):
        TrainConfig(store="disk", data_on_root=True)
    with pytest.raises(UserError, match="pre-training"):
        TrainConfig(store="disk", pretext="rotation")
    with pytest.raises(UserError, match="--store must be one of"):
        TrainConfig(store="tape")
    assert TrainConfig(store="auto", data_on_root=True).store == "auto"


def _train(synth_data, out, store_mode, cache):
    from mpitrain.train.command import train_main

    cfg = TrainConfig(
        data=str(synth_data),
        model="tiny",
        image_size=16,
        epochs=2,
        augment="xray",
        out=str(out),
        store=store_mode,
        cache_dir=str(cache),
    )
    said: list[str] = []
    assert train_main(lambda: cfg, echo=said.append) == 0
    return json.loads((out / "config.json").read_text())["runtime"]["checksum"], said


@pytest.fixture
def isolated(monkeypatch):
    from mpitrain import runtime
    from mpitrain.parallel import comm

    # What a training sets for the rest of its process: put back after the test.
    monkeypatch.setattr(comm, "_WORLD", comm._WORLD)
    monkeypatch.setattr(runtime, "_started", runtime._started)


def test_the_store_trains_the_same_weights_as_memory(synth_data, tmp_path, isolated):
    memory, said = _train(synth_data, tmp_path / "mem", "memory", tmp_path / "c")
    assert not any(line.startswith("store:") for line in said)
    disk, said = _train(synth_data, tmp_path / "disk", "disk", tmp_path / "c")
    line = next(line for line in said if line.startswith("store: disk, "))
    assert str(tmp_path / "c" / "store") in line and "MB at" in line and "(written now)" in line
    assert disk == memory
    again, said = _train(synth_data, tmp_path / "disk2", "disk", tmp_path / "c")
    assert again == memory and any(line.endswith("(found)") for line in said if line.startswith("store:"))


def test_a_store_that_would_not_fit_is_one_line_before_training(synth_data, tmp_path, cli_error, monkeypatch):
    monkeypatch.setattr(store, "free_bytes", lambda folder: 1000)
    args = ["train", "--data", synth_data, "--model", "tiny", "--image-size", 16, "--store", "disk"]
    line = cli_error([*args, "--cache-dir", tmp_path / "c", "--out", tmp_path / "run"], "GB free", "--cache-dir")
    assert "0.00 GB free" in line
    assert not (tmp_path / "run").exists()  # nothing left behind
    assert not list((tmp_path / "c" / "store").iterdir())


@pytest.mark.parametrize("how", ["a file in the way", "read-only"])
def test_an_unwritable_cache_folder_is_one_line_before_training(synth_data, tmp_path, cli_error, how):
    cache = tmp_path / "c"
    if how == "read-only":
        cache.mkdir()
        cache.chmod(0o555)
        if os.access(cache, os.W_OK):
            pytest.skip("root writes into a read-only folder: the other case covers the message")
    else:
        cache.write_text("a file where the cache folder should be")
    args = ["train", "--data", synth_data, "--model", "tiny", "--image-size", 16, "--store", "disk"]
    cli_error([*args, "--cache-dir", cache, "--out", tmp_path / "run"], "cannot write the image store", "--cache-dir")
    assert not (tmp_path / "run").exists()


def test_stale_temporary_files_and_unused_stores_are_pruned(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    names = [".tmp-crashed-a.npy", ".tmp-writing-b.npy", "old.npy", "used.npy", "other.txt"]
    for name in names:
        (folder / name).write_bytes(b"x")
    day, now = 86400, 1e9
    ages = {".tmp-crashed-a.npy": 2 * day, ".tmp-writing-b.npy": 60, "old.npy": 31 * day, "used.npy": 29 * day}
    for name in names:
        t = now - ages.get(name, 400 * day)
        os.utime(folder / name, (t, t))
    store._prune(folder, now=now)
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-writing-b.npy", "other.txt", "used.npy"]


def test_a_write_that_fails_half_way_stops_every_rank_and_leaves_nothing(data, tmp_path, monkeypatch):
    plan = make_plan(str(data), None, 0.25, 1)

    def full(fd, data, at):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_write_all", full)
    with pytest.raises(AgreedError, match="cannot write the image store .*: No space left on device"):
        _as_ranks([0, 0], lambda comm: store.open_stores(comm, plan, 16, 1, str(tmp_path / "c")))
    assert not list((tmp_path / "c" / "store").iterdir())


def test_multi_label_rows_keep_their_label_arrays(data, tmp_path):
    from mpitrain.data.dataset import Plan

    base = make_plan(str(data), None, 0.25, 1)
    rng = np.random.default_rng(0)

    def table(n):  # [n, 3] of 1, 0 and NaN (an ignored cell)
        return rng.choice(np.array([0.0, 1.0, np.nan]), size=(n, 3))

    plan = Plan(
        base.data_dir,
        ["a", "b", "c"],
        base.train_paths,
        table(len(base.train_paths)),
        base.val_paths,
        table(len(base.val_paths)),
        "split",
        train_source=base.train_source,
        val_source=base.val_source,
    )
    got = store.open_stores(SingleComm(), plan, 16, 1, str(tmp_path / "c")).shard(plan, 3, (0, 1), (0, 1))
    mine = load_shard(plan, 16, 3, (0, 1), (0, 1), str(tmp_path / "mem"))
    for split in ("train", "val"):
        y, want = getattr(got, f"{split}_y"), getattr(mine, f"{split}_y")
        assert y.dtype == want.dtype == np.float32 and y.shape == want.shape and y.shape[1] == 3
        assert np.array_equal(y, want, equal_nan=True)
