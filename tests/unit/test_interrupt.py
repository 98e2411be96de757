"""Ctrl-C that lands inside TensorFlow's C++ (tracing a step) can surface as another error
(SystemError "bad argument to internal function", or a TypeError wrapped by autograph):
`mpitrain train` still says where it stopped and how to continue, and exits with 130."""

import os
import signal

import pytest

from mpitrain.config import TrainConfig
from mpitrain.parallel import preempt
from mpitrain.train import command


def _swallowed_ctrl_c(*_args, **_kwargs):
    # What C++ code does with a pending KeyboardInterrupt: it raises its own error instead.
    try:
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0)  # let the handler run here, not later
    except KeyboardInterrupt:
        raise SystemError("Objects/listobject.c:338: bad argument to internal function") from None
    raise AssertionError("SIGINT did not arrive")


def test_an_error_raised_by_a_ctrl_c_is_the_interrupt(synth_data, tmp_path, monkeypatch, capsys):
    assert _train_in(synth_data, tmp_path, monkeypatch, _swallowed_ctrl_c) == 130
    err = capsys.readouterr().err
    assert "mpitrain: interrupted" in err and "SystemError" not in err, err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_the_same_error_without_ctrl_c_stays_an_error(synth_data, tmp_path, monkeypatch):
    def fails(*_args, **_kwargs):
        raise SystemError("bad argument to internal function")

    with pytest.raises(SystemError):
        _train_in(synth_data, tmp_path, monkeypatch, fails)
    assert not preempt.interrupted()


def test_an_ignored_ctrl_c_stays_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        restore = preempt.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        restore()
    finally:
        signal.signal(signal.SIGINT, old)


def _train_in(data, tmp_path, monkeypatch, fake):
    from mpitrain import runtime
    from mpitrain.parallel import comm

    monkeypatch.setattr(comm, "_WORLD", comm._WORLD)
    monkeypatch.setattr(runtime, "_started", runtime._started)
    monkeypatch.setattr(command, "_train", fake)
    cfg = TrainConfig(data=str(data), model="tiny", image_size=16, epochs=1, out=str(tmp_path / "run"))
    return command.train_main(lambda: cfg, echo=lambda *a, **k: None)
