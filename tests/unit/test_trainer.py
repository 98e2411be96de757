"""The training loop in one process (SingleComm): what a library caller relies on."""

import threading

import numpy as np
import pytest

from mpitrain.config import TrainConfig
from mpitrain.data.dataset import Plan, Shard
from mpitrain.parallel.comm import SingleComm


def _tiny_job(n=24, size=12):
    from mpitrain.runtime import configure_runtime
    from mpitrain.train.models import build_model

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n).astype(np.int32)
    x = rng.random((n, size, size, 1), dtype=np.float32)
    plan = Plan("mem", ["a", "b"], [""] * n, y, [""] * 8, y[:8], "split")
    data = Shard(x, y, x[:8], y[:8])
    configure_runtime(0, 1, 1)
    cfg = TrainConfig(epochs=3, batch_size=8, model="tiny", image_size=size, timeout=600, class_weight="none")
    return cfg, plan, data, build_model("tiny", size, 2)


def test_fit_stops_its_watchdog_when_it_raises():
    # A library caller that catches the error must not keep a watchdog thread that aborts
    # the process --timeout seconds later.
    from mpitrain.train.fitting import engine_for

    cfg, plan, data, model = _tiny_job()

    def echo(line):
        if line.startswith("epoch 1/"):
            raise RuntimeError("the caller's callback failed")

    before = set(threading.enumerate())
    trainer = engine_for(cfg, SingleComm(), plan, data, model, echo=echo)
    with pytest.raises(RuntimeError, match="callback failed"):
        trainer.fit()
    started = [t for t in threading.enumerate() if t.name == "mpitrain-watchdog" and t not in before]
    for t in started:
        t.join(5.0)
    assert not [t for t in started if t.is_alive()]


@pytest.mark.parametrize("signal_after, stops_at", [(1, 1), (3, None)])
def test_a_stop_request_during_validation_stops_after_that_epochs_checkpoint(tmp_path, signal_after, stops_at):
    # SIGUSR1 while epoch `signal_after` validates (its line is echoed then): the run stops
    # after that epoch's checkpoint, unless it was the last epoch, which finishes instead.
    import os
    import signal

    from mpitrain.engine import checkpoint
    from mpitrain.errors import StopRequested
    from mpitrain.parallel import preempt
    from mpitrain.train.fitting import engine_for

    cfg, plan, data, model = _tiny_job()

    def echo(line):
        if line.startswith(f"epoch {signal_after}/"):
            os.kill(os.getpid(), signal.SIGUSR1)

    restore = preempt.install()
    try:
        trainer = engine_for(cfg, SingleComm(), plan, data, model, echo=echo, checkpoints=True, run_dir=tmp_path)
        if stops_at is None:
            assert trainer.fit().epochs_run == 3
            return
        with pytest.raises(StopRequested) as stop:
            trainer.fit()
    finally:
        restore()
    assert (stop.value.epoch, stop.value.step) == (stops_at, 0)
    assert checkpoint.list_checkpoints(tmp_path)[-1].name == f"ckpt-e{stops_at:05d}-s0000000.npz"


@pytest.mark.parametrize("ranks, written_steps, step, goes_on_at", [(2, 6, 4, 2), (1, 3, 2, 2)])
def test_a_mid_epoch_checkpoint_goes_on_at_the_same_fraction_of_the_epoch(ranks, written_steps, step, goes_on_at):
    # Written by another number of ranks (an elastic job that lost a host): 4 of 6 steps
    # done is 2 of this job's 3, not step 4 (past the end: the epoch would be skipped). By
    # the same number of ranks the position is kept as it is (and so are the epoch's sums).
    from mpitrain.engine.checkpoint import Checkpoint
    from mpitrain.train.fitting import engine_for

    cfg, plan, data, model = _tiny_job()
    lines = []
    trainer = engine_for(cfg, SingleComm(), plan, data, model, echo=lines.append)
    assert trainer.steps == 3
    ckpt = Checkpoint(
        epoch=1,
        step=step,
        ranks=ranks,
        strategy="allreduce",
        shared=True,
        steps=written_steps,
        states=[trainer.state.arrays(np.array([16.0, 11.0, 9.0]))],
        config=cfg.to_dict(),
        history=[{"epoch": 1}],
    )
    result = trainer.fit(ckpt, resuming=True)
    assert f"resuming at epoch 2, step {goes_on_at} of 3" in lines
    assert result.epochs_run == 3 and len(result.history) == 3
