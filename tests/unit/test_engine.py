"""The engine as a library: a caller's own Keras model, arrays and callbacks (one process)."""

import subprocess
import sys

import numpy as np
import pytest

import mpitrain
from blobs import blobs as _blobs
from blobs import tiny_model as _model


def test_the_public_face_is_pinned():
    assert mpitrain.__all__ == [
        "__version__",
        "rank",
        "size",
        "Callback",
        "EarlyStopping",
        "Engine",
        "FreezeBackbone",
        "InMemory",
        "KeepBest",
        "Options",
        "ProgressBar",
        "Result",
        "TensorBoard",
        "allreduce",
        "broadcast",
        "fit",
        "StopRequested",
        "UserError",
    ]
    for name in mpitrain.__all__:
        assert getattr(mpitrain, name) is not None
    assert (mpitrain.rank(), mpitrain.size()) == (0, 1)
    with pytest.raises(AttributeError):
        mpitrain.no_such_name  # noqa: B018


def test_importing_mpitrain_does_not_import_tensorflow():
    # The command line's start-up and `--help` must stay fast: names load on first use.
    code = "import sys, mpitrain; mpitrain.rank(); print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


class Recorder(mpitrain.Callback):
    def __init__(self):
        self.rows, self.batches, self.began, self.ended = [], 0, 0, 0

    def on_train_begin(self, logs=None):
        self.began += 1

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append((epoch, dict(logs)))

    def on_train_end(self, logs=None):
        self.ended += 1


def test_fit_trains_a_callers_model_of_any_class_count_and_calls_its_callbacks():
    x, y = _blobs()
    model = _model(n_classes=3)
    rec = Recorder()
    before = [w.copy() for w in model.get_weights()]
    result = mpitrain.fit(
        model, x, y, validation_data=(x[:32], y[:32]), epochs=8, batch_size=16, lr=1e-2, callbacks=[rec], progress=False
    )
    assert [r["epoch"] for r in result.history] == list(range(1, 9))
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(result.history[0])
    assert result.history[-1]["val_accuracy"] > 0.9  # chance is 1/3
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # trained in place
    assert rec.began == rec.ended == 1 and rec.batches == 8 * 6  # 96 rows / 16 per step
    assert [e for e, _ in rec.rows] == list(range(8))
    assert rec.rows[-1][1] == result.history[-1]  # the global row, as the history holds it
    assert result.val_probs.shape == (32, 3)


def test_fit_refuses_an_unknown_option():
    x, y = _blobs(16)
    with pytest.raises(TypeError, match="epocs"):
        mpitrain.fit(_model(), x, y, validation_data=(x, y), epocs=2)


class Nudge(mpitrain.Callback):
    """At the end of epoch `best` (after KeepBest has looked) replaces the weights by loud
    noise, so the next epochs validate worse; records them first."""

    def __init__(self, best):
        self.best, self.kept = best, None

    def on_epoch_end(self, epoch, logs=None):
        model = self.engine.model
        if epoch + 1 == self.best:
            self.kept = [w.copy() for w in model.get_weights()]
            rng = np.random.default_rng(0)
            model.set_weights([rng.normal(0, 10, w.shape).astype(w.dtype) for w in self.kept])


def test_keep_best_restores_the_best_epochs_weights_and_early_stopping_ends_the_run():
    x, y = _blobs()
    model, nudge = _model(), Nudge(best=2)
    result = mpitrain.fit(
        model,
        x,
        y,
        validation_data=(x[:32], y[:32]),
        epochs=10,
        batch_size=16,
        lr=1e-2,
        callbacks=[mpitrain.KeepBest("val_loss"), mpitrain.EarlyStopping("val_loss", patience=2), nudge],
        progress=False,
    )
    losses = [r["val_loss"] for r in result.history]
    best = int(np.argmin(losses)) + 1
    assert result.stopped_early and result.epochs_run == best + 2 < 10
    assert result.kept_epoch == best
    assert best == nudge.best
    for a, b in zip(nudge.kept, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_the_step_hook_wraps_every_train_step_the_engine_makes():
    from mpitrain.engine import Engine, InMemory, Options

    x, y = _blobs(32)
    calls = []

    def wrap(step):
        def timed(*args):
            calls.append(len(args[0]))
            return step(*args)

        return timed

    engine = Engine(
        _model(), InMemory(x, y, x[:8], y[:8]), Options(epochs=1, batch_size=8), progress=False, wrap_step=wrap
    )
    engine.fit()
    assert calls == [8, 8, 8, 8]


def test_integer_rows_with_a_channel_axis_train_as_their_scaled_floats():
    # Colour or grey rows that already carry their channel axis go in as they are.
    from mpitrain.engine import Engine, InMemory, Options

    x, y = _blobs(32)
    rows = np.round(x * 255).astype(np.uint8)
    runs = []
    for data in (
        InMemory(rows, y, rows[:8], y[:8], 255.0, 255.0),
        InMemory(rows / np.float32(255), y, rows[:8] / np.float32(255), y[:8]),
    ):
        model = _model(seed=1)
        Engine(model, data, Options(epochs=2, batch_size=8), progress=False).fit()
        runs.append(model.get_weights())
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_compiled_model_trains_with_its_own_loss_and_optimizer():
    # Logits out, a from_logits loss, an SGD with a schedule: the engine must use all three
    # (cross-entropy on logits as if they were probabilities would give other numbers).
    import keras

    x, y = _blobs()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=6, decay_rate=0.5)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    result = mpitrain.fit(model, x, y, validation_data=(x[:32], y[:32]), epochs=3, batch_size=16, progress=False)
    assert int(model.optimizer.iterations.numpy()) == 3 * 6  # its own optimizer took every step
    assert result.history[-1]["lr"] == pytest.approx(0.5 * 0.5 ** (18 / 6), rel=1e-5)  # its schedule, untouched
    keras_loss, keras_acc = model.evaluate(x[:32], y[:32], batch_size=32, verbose=0)
    assert result.history[-1]["val_loss"] == pytest.approx(keras_loss, rel=1e-4)
    assert result.history[-1]["val_accuracy"] == pytest.approx(keras_acc)


def test_allreduce_and_broadcast_in_one_process_hand_back_the_same_kinds():
    import tensorflow as tf

    values = [np.arange(3, dtype=np.float32), tf.constant([[1.0, 2.0]]), 4, np.float64(2.5)]
    out = mpitrain.allreduce(values)
    assert isinstance(out, list) and isinstance(out[0], np.ndarray) and tf.is_tensor(out[1])
    assert out[2] == 4.0 and out[3] == 2.5 and out[0].dtype == np.float32
    np.testing.assert_array_equal(out[1].numpy(), [[1.0, 2.0]])
    with pytest.raises(ValueError, match="mean, sum"):
        mpitrain.allreduce(1.0, op="min")
    model = _model()
    before = [w.copy() for w in model.get_weights()]
    mpitrain.broadcast(model)  # one rank: its own values, unchanged
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def _pydataset(x, y, batch):
    import keras

    class Rows(keras.utils.PyDataset):
        def __len__(self):
            return -(-len(x) // batch)

        def __getitem__(self, i):
            return x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]

    return Rows()


@pytest.mark.parametrize("kind", ["pydataset", "tf.data batched", "tf.data unbatched, unknown length"])
def test_fit_takes_a_pydataset_or_a_tf_data_dataset_as_the_arrays_it_holds(kind):
    # One process: the dataset's rows in its order must train exactly as the same arrays do
    # (sharding one rank keeps every row; the engine's own shuffle does the rest).
    import tensorflow as tf

    x, y = _blobs(64)
    if kind == "pydataset":
        train, val = _pydataset(x, y, 16), _pydataset(x[:16], y[:16], 8)
    elif kind.startswith("tf.data batched"):
        train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        val = tf.data.Dataset.from_tensor_slices((x[:16], y[:16])).batch(8)
    else:
        train = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True)  # length unknown
        val = tf.data.Dataset.from_tensor_slices((x[:16], y[:16]))
    runs = []
    for source, validation in ((train, val), (x, (x[:16], y[:16]))):
        model = _model(seed=2)
        labels = y if source is x else None
        result = mpitrain.fit(model, source, labels, validation_data=validation, epochs=2, batch_size=8, progress=False)
        runs.append((model.get_weights(), result.history[-1]["val_loss"]))
    (w1, loss1), (w2, loss2) = runs
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)
    assert loss1 == loss2


def test_fit_wants_labels_with_arrays():
    x, _ = _blobs(16)
    with pytest.raises(TypeError, match="labels"):
        mpitrain.fit(_model(), x, validation_data=None)


def test_the_timeout_defaults_to_what_mpitrain_run_says(monkeypatch):
    from mpitrain.engine import Options

    monkeypatch.delenv("MPITRAIN_TIMEOUT", raising=False)
    assert Options().resolved().timeout == 0.0  # a library call alone: no watchdog
    monkeypatch.setenv("MPITRAIN_TIMEOUT", "90")
    assert Options().resolved().timeout == 90.0
    assert Options(timeout=5).resolved().timeout == 5.0  # the caller's own value wins
