"""Checkpoint files: atomic, bounded in number, damaged ones skipped, newer formats refused."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from mpitrain.engine import checkpoint as ck


def _ckpt(epoch, step, value=1.0, shared=True, ranks=1):
    states = [[np.full((3, 2), value, np.float32), np.array([epoch], np.int64)]]
    return ck.Checkpoint(
        epoch=epoch,
        step=step,
        ranks=ranks,
        strategy="allreduce",
        states=states,
        shared=shared,
        config={"seed": 1},
        history=[{"epoch": epoch}],
    )


def test_round_trip_keeps_exact_arrays_and_metadata(tmp_path):
    path = ck.save(tmp_path, _ckpt(2, 5, value=0.25))
    got = ck.read(path)
    assert (got.epoch, got.step, got.config, got.history) == (2, 5, {"seed": 1}, [{"epoch": 2}])
    assert got.state_of(7)[0].dtype == np.float32 and np.all(got.state_of(7)[0] == 0.25)
    assert got.state_of(0)[1].dtype == np.int64


def test_only_the_newest_k_are_kept_in_progress_order(tmp_path):
    for e, s in [(0, 5), (0, 10), (1, 0), (1, 5)]:
        ck.save(tmp_path, _ckpt(e, s), keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt-e00001-s0000000.npz", "ckpt-e00001-s0000005.npz"]


def test_every_reader_takes_the_newest_by_progress(tmp_path):
    # Written out of order, across a step checkpoint and epochs 9 and 10 (names sort by
    # progress, not by when they were written): resume, the launcher's saved config and
    # position, and the finishing mark all take epoch 10's.
    for e, s in [(10, 0), (9, 0), (9, 5), (2, 40)]:
        c = _ckpt(e, s, value=float(e))
        c.config = {"seed": e}
        ck.save(tmp_path, c, keep=0)
    assert ck.load_latest(tmp_path).epoch == 10
    path, meta = ck.latest_meta(tmp_path)
    assert (meta["epoch"], meta["step"]) == (10, 0) and path.name == "ckpt-e00010-s0000000.npz"
    assert ck.saved_config(tmp_path) == {"seed": 10}
    assert ck.mark_finished(tmp_path) == path
    assert ck.read(path).status == "finished" and np.all(ck.read(path).state_of(0)[0] == 10.0)
    assert all(ck.read(p).status != "finished" for p in ck.list_checkpoints(tmp_path)[:-1])


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    ck.save(tmp_path, _ckpt(1, 0, value=1.0))
    newest = ck.save(tmp_path, _ckpt(2, 0, value=2.0))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    warnings = []
    got = ck.load_latest(tmp_path, warn=warnings.append)
    assert got.epoch == 1 and np.all(got.state_of(0)[0] == 1.0)
    assert len(warnings) == 1 and newest.name in warnings[0]


def test_a_flipped_byte_is_detected(tmp_path):
    ck.save(tmp_path, _ckpt(1, 0))
    newest = ck.save(tmp_path, _ckpt(2, 0, value=3.0))
    data = bytearray(newest.read_bytes())
    with zipfile.ZipFile(newest) as z:
        info = z.getinfo("r0_0.npy")
    data[info.header_offset + 30 + len(info.filename) + 100] ^= 0xFF  # inside the stored array
    newest.write_bytes(bytes(data))
    assert ck.load_latest(tmp_path, warn=lambda m: None).epoch == 1


def _make_too_new(path):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta["format"] = ck.FORMAT + 1
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_a_newer_format_is_refused_not_misread(tmp_path):
    _make_too_new(ck.save(tmp_path, _ckpt(1, 0)))
    with pytest.raises(ck.CheckpointTooNew, match="newer"):
        ck.load_latest(tmp_path)


def test_a_newer_newest_checkpoint_is_refused_not_skipped_as_damaged(tmp_path):
    ck.save(tmp_path, _ckpt(1, 0))
    _make_too_new(ck.save(tmp_path, _ckpt(2, 0)))
    with pytest.raises(ck.CheckpointTooNew):
        ck.load_latest(tmp_path, warn=lambda m: pytest.fail(f"skipped as damaged: {m}"))


def test_refusal_goes_by_the_exception_type_not_its_wording(tmp_path, monkeypatch):
    ck.save(tmp_path, _ckpt(1, 0))
    newest = ck.save(tmp_path, _ckpt(2, 0))
    real_read = ck.read

    def read(path):
        if path == newest:
            raise ck.CheckpointTooNew("format 7 is from the future")  # reworded
        return real_read(path)

    monkeypatch.setattr(ck, "read", read)
    with pytest.raises(ck.CheckpointTooNew):
        ck.load_latest(tmp_path, warn=lambda m: pytest.fail(f"skipped as damaged: {m}"))


KILL_DURING_WRITE = r"""
import os, signal, sys
import numpy as np
from mpitrain.engine import checkpoint as ck
run = sys.argv[1]
states = [[np.ones((256, 256), np.float32)]]
ck.save(run, ck.Checkpoint(epoch=1, step=0, ranks=1, strategy="allreduce", states=states, shared=True))
real = np.savez
def dying_savez(f, **arrays):
    f.write(b"PK\x03\x04 half a zip")  # some bytes reach the temporary file, then the process dies
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
np.savez = dying_savez
ck.save(run, ck.Checkpoint(epoch=2, step=0, ranks=1, strategy="allreduce", states=states, shared=True))
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(tmp_path)], timeout=60)
    assert proc.returncode == -9
    leftovers = os.listdir(tmp_path / "checkpoints")
    assert any(name.startswith(".") for name in leftovers)  # the interrupted temporary file
    got = ck.load_latest(tmp_path, warn=lambda m: pytest.fail(m))
    assert got.epoch == 1 and got.state_of(0)[0].shape == (256, 256)
