"""The compiled train step (train/steps.py): what it counts, an empty local batch, and the
lean step's promises (integer input scaled in the graph to the same bits, running sums
kept in the step equal to the host's float64 sums)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[2] / "src"

# Runs in a child process: with oneDNN an empty batch aborted the whole process
# (SIGABRT in MaxPoolingGrad), which must fail this one test, not end the session.
CHECK = textwrap.dedent("""
    import os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    from mpitrain.runtime import configure_runtime
    from mpitrain.train.models import build_model
    from mpitrain.engine.steps import make_train_step

    configure_runtime(0, 1, 1)
    rng = np.random.default_rng(0)
    for name in ("tiny", "seed"):
        model = build_model(name, 12, 2)
        opt = keras.optimizers.SGD(0.1)  # no momentum: a zero gradient leaves the weights
        opt.build(model.trainable_variables)
        seen = []

        def reduce(buf):  # what one rank hands to the allreduce
            seen.append(np.array(buf))
            return np.array(buf)

        step = make_train_step(model, opt, reduce)
        x = rng.random((5, 12, 12, 1)).astype(np.float32)
        y = np.array([0, 1, 1, 0, 1], np.int32)
        stats, probs = step(x, y, np.full(5, 0.5, np.float32), np.float32(0.1))
        hits = int((probs.numpy().argmax(1) == y).sum())
        assert stats.numpy()[0] == 5 and stats.numpy()[2] == hits, (name, stats)

        kernel, bias = model.layers[-1].get_weights()  # every image, the zero one too, is class 0:
        model.layers[-1].set_weights([kernel, np.array([20.0, -20.0], np.float32)])  # a padding row would be a hit
        before = [w.copy() for w in model.get_weights()]
        stats, probs = step(x[:0], y[:0], np.zeros(0, np.float32), np.float32(0.1))
        assert stats.numpy().tolist() == [0.0, 0.0, 0.0], (name, stats)
        assert tuple(probs.shape) == (0, 2), (name, probs.shape)
        assert len(seen) == 2 and not seen[1].any(), name  # it joined the allreduce, with zeros
        after = model.get_weights()
        assert all(np.array_equal(a, b) for a, b in zip(before, after)), name
    print("empty batch ok")
""")


def test_an_empty_local_batch_joins_the_step_with_nothing():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "empty batch ok" in proc.stdout, (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )


# ---- the lean step: integer input scaled in the graph, running sums kept on the device ----


def _model_and_step(reduce=None, input_dtype=np.float32, max_value=1.0, size=12):
    import keras

    from mpitrain.engine.steps import make_train_step
    from mpitrain.runtime import configure_runtime
    from mpitrain.train.models import build_model

    configure_runtime(0, 1, 1)
    model = build_model("tiny", size, 2)
    opt = keras.optimizers.Adam(1e-2)
    opt.build(model.trainable_variables)
    return model, make_train_step(model, opt, reduce, input_dtype=input_dtype, max_value=max_value)


def test_integer_images_are_scaled_in_the_graph_to_the_bits_numpy_computes():
    # Every uint8 and uint16 value: a graph division by a constant becomes a multiplication
    # by the reciprocal, which is one bit off for about half of the uint8 values.
    import tensorflow as tf

    from mpitrain.engine.steps import to_float_input
    from mpitrain.pixels import to_float

    for dtype, full in ((np.uint8, 255.0), (np.uint16, 65535.0), (np.uint16, 4095.0)):
        rows = np.arange(int(full) + 1).astype(dtype).reshape(-1, 1, 1)
        divisor = tf.Variable(full, dtype=tf.float32)
        scale = tf.function(
            lambda x, divisor=divisor: to_float_input(x, divisor),
            input_signature=[tf.TensorSpec((None, 1, 1, 1), tf.as_dtype(dtype))],
        )
        got = scale(rows[..., np.newaxis]).numpy()
        assert got.dtype == np.float32
        assert np.array_equal(got, to_float(rows, full)), (dtype, full, int((got != to_float(rows, full)).sum()))


def test_a_step_on_uint8_rows_trains_exactly_as_on_their_float_conversion():
    from mpitrain.pixels import as_float

    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, (3, 8, 12, 12), dtype=np.uint8)
    y = rng.integers(0, 2, (3, 8)).astype(np.int32)
    w = np.ones(8, np.float32)
    weights = []
    for integer in (False, True):
        model, step = _model_and_step(
            input_dtype=np.uint8 if integer else np.float32, max_value=255.0 if integer else 1.0
        )
        model.set_weights([np.full(v.shape, 0.01 * (i + 1), np.float32) for i, v in enumerate(model.weights)])
        for b in range(3):
            step(rows[b][..., np.newaxis] if integer else as_float(rows[b], 255.0), y[b], w, np.float32(1e-2))
        weights.append(model.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(*weights))
    assert not np.array_equal(weights[1][0], np.full_like(weights[1][0], 0.01))  # it did train


def test_the_running_sums_add_up_each_steps_statistics_in_float64():
    rng = np.random.default_rng(2)
    model, step = _model_and_step()
    expected = np.array([5.0, 1.25, 2.0])  # a resumed epoch starts from its saved sums
    step.sums.reset(expected)
    for b in range(4):
        n = 3 + b
        x = rng.random((n, 12, 12, 1), dtype=np.float32)
        y = rng.integers(0, 2, n).astype(np.int32)
        w = np.where(np.arange(n) == 0, 0.0, 0.7).astype(np.float32)  # a weight-0 row is not counted
        stats, _ = step(x, y, w, np.float32(1e-3))
        st = stats.numpy()
        assert st[0] == n - 1
        expected += st  # what the trainer computed on the host before the sums moved into the step
    got = step.sums.read()
    assert got.dtype == np.float64 and np.array_equal(got, expected), (got, expected)
    got[0] = -1.0  # a copy: the caller may change it (the allreduce does, in place)
    assert step.sums.read()[0] == expected[0]
    step.sums.reset()
    assert step.sums.read().tolist() == [0.0, 0.0, 0.0]


def test_the_running_sums_are_the_reduced_global_ones():
    # Under a per-step reduce the step's statistics are the global ones; the sums follow them.
    def reduce(buf):
        out = np.array(buf, copy=True)
        out[-3:] *= 2  # as if a second rank had the same batch
        return out

    _, step = _model_and_step(reduce)
    x = np.random.default_rng(3).random((4, 12, 12, 1), dtype=np.float32)
    stats, _ = step(x, np.array([0, 1, 0, 1], np.int32), np.ones(4, np.float32), np.float32(1e-3))
    assert stats.numpy()[0] == 8 and step.sums.read()[0] == 8.0


def test_the_progress_bar_fetches_its_numbers_only_when_it_draws(monkeypatch):
    import io

    from mpitrain.engine.callbacks.progress import Progress

    calls = []

    def values():
        calls.append(1)
        return {"loss": 0.25}

    off = Progress(10, "epoch 1/2 ", enabled=False)
    for s in range(10):
        off.update(s + 1, values=values)
    assert calls == []  # a rank without a bar never reads the sums
    monkeypatch.setenv("MPITRAIN_TTY", "1")
    monkeypatch.delenv("MPITRAIN_LAUNCHER", raising=False)
    out = io.StringIO()
    bar = Progress(1000, "epoch 1/2 ", stream=out)
    for s in range(1000):
        bar.update(s + 1, values=values)
    assert 1 <= len(calls) < 50  # at most 10 redraws a second, and the last step
    assert "loss 0.2500" in out.getvalue()
