"""Shared pytest fixtures.

Data-layer fixtures (imagefolder, decode, cache, split, datainfo tests) are prefixed with
``image_`` / ``write_image``; they generate tiny images into ``tmp_path`` with OpenCV.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

# A test run started in the background by a non-interactive shell (`make test &`, nohup)
# inherits SIGINT as ignored, and so would every training it starts: the Ctrl-C tests would
# then wait for a process that cannot be interrupted. A handler here makes every child start
# with the default disposition again (handlers are reset on exec, "ignored" is inherited).
signal.signal(signal.SIGINT, signal.default_int_handler)


def _write_image(path: Path, img: np.ndarray | None = None, value: int = 128, size: int = 16) -> Path:
    """Write ``img`` (default: a ``size``x``size`` gray square of ``value``) with cv2."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if img is None:
        img = np.full((size, size), value, np.uint8)
    ext = path.suffix.lower() if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"} else ".png"
    ok, buf = cv2.imencode(ext, img)
    assert ok, path
    path.write_bytes(buf.tobytes())
    return path


@pytest.fixture
def write_image():
    """The `_write_image(path, img=None, value=128, size=16)` helper."""
    return _write_image


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """``tmp_path/data`` with classes ``cat`` (3 images, one nested) and ``dog`` (2)."""
    root = tmp_path / "data"
    _write_image(root / "cat" / "a.png", value=10)
    _write_image(root / "cat" / "b.jpg", value=20)
    _write_image(root / "cat" / "sub" / "c.png", value=30)
    _write_image(root / "dog" / "a.png", value=200)
    _write_image(root / "dog" / "b.bmp", value=250)
    return root


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small synthetic two-class data set (40 images per class, 16x16), made once."""
    from mpitrain.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth") / "data", per_class=40, image_size=16, seed=1)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test caches into a private folder, never into the user's ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "mpitrain-cache"
    monkeypatch.setenv("MPITRAIN_CACHE_DIR", str(cache))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synth_data) -> Path:
    """A finished run folder of the tiny model on `synth_data` (one training per session)."""
    from mpirun import train_run

    return train_run(tmp_path_factory, synth_data)


_WATCHED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


@pytest.fixture
def cli_error(capsys, monkeypatch, tmp_path):
    """`cli_error(args, *words)`: run `mpitrain ARGS` in this process, as a user's mistake must
    fail: exit code 2, one line on stderr starting "mpitrain: error: " and holding `words`, no
    traceback, no mpiexec started (MPITRAIN_MPIEXEC points at a stand-in that leaves a mark),
    and no signal handler or thread left behind. Returns the line.

    In-process because an interpreter per case costs its start and, past argparse, a
    TensorFlow import each; `test_first_contact.py` checks that a real process says the same."""
    from mpitrain import runtime
    from mpitrain.cli import main
    from mpitrain.parallel import comm

    (tmp_path / "cli_error").mkdir()
    mark = tmp_path / "cli_error" / "mpiexec-was-started"
    fake = tmp_path / "cli_error" / "fake-mpiexec"
    fake.write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    fake.chmod(0o755)
    # What a command sets for the rest of its process: put back after the test.
    monkeypatch.setattr(comm, "_WORLD", comm._WORLD)
    monkeypatch.setattr(runtime, "_started", runtime._started)

    def run(args, *words: str) -> str:
        handlers = {s: signal.getsignal(s) for s in _WATCHED_SIGNALS}
        threads = set(threading.enumerate())
        # Only for the call: a process the test starts itself gets the real mpiexec.
        with monkeypatch.context() as env:
            env.setenv("MPITRAIN_MPIEXEC", str(fake))
            env.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
            try:
                code: int | str | None = main([str(a) for a in args])
            except SystemExit as e:  # argparse's errors leave through sys.exit
                code = e.code
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (code, out, err)
        assert len(lines) == 1, err
        assert lines[0].startswith("mpitrain: error: "), lines[0]
        assert "Traceback" not in err and "----" not in out + err
        for w in words:
            assert w in lines[0], lines[0]
        assert not mark.exists(), "mpiexec was started"
        assert {s: signal.getsignal(s) for s in _WATCHED_SIGNALS} == handlers, "a signal handler was left behind"
        assert set(threading.enumerate()) <= threads, "a thread was left running"
        return lines[0]

    return run
