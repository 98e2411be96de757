import threading
import time

import pytest

from mpitrain.parallel.watchdog import Watchdog


def test_beats_keep_it_quiet_and_silence_fires_it(monkeypatch):
    fired = threading.Event()
    monkeypatch.setattr("os._exit", lambda code: None)  # keep the test process alive
    dog = Watchdog(0.4, fired.set).start()
    for _ in range(8):
        time.sleep(0.1)
        dog.beat("working")
    assert not fired.is_set()
    assert fired.wait(3.0)
    dog.stop()


def test_zero_timeout_means_no_watchdog():
    dog = Watchdog(0, lambda: pytest.fail("fired")).start()
    assert dog._thread is None
