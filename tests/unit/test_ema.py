"""--ema (the weights' moving average) and --label-smoothing, in one process.

The average follows Keras' formula step by step and is what validation, --keep-best and
the saved model see, while training goes on from the raw weights; a resumed run ends
bit-identical to the uninterrupted one; local-sgd averages the averages with the weights;
label smoothing changes the training loss and never val_loss; the refusals are one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import mpitrain  # noqa: E402
from blobs import blobs, tiny_model  # noqa: E402
from mpitrain import runfiles  # noqa: E402
from mpitrain.config import TrainConfig  # noqa: E402
from mpitrain.engine import Engine, InMemory, Options  # noqa: E402
from mpitrain.engine.checkpoint import list_checkpoints, read  # noqa: E402
from mpitrain.errors import UserError  # noqa: E402
from mpitrain.parallel.comm import SingleComm  # noqa: E402
from mpitrain.parallel.flat import FlatVars, moving_averages  # noqa: E402
from mpitrain.parallel.strategies import make_sync, resolve  # noqa: E402


def _model(seed=0, compiled=None):
    return tiny_model(seed=seed, compiled=compiled)


def _blobs(n=48, seed=0):
    return blobs(n, seed=seed)


def _values(variables) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in variables]


class Watch(mpitrain.Callback):
    """The trainable weights after every step (raw) and at every epoch's end (what is judged)."""

    def __init__(self):
        self.raw, self.judged = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.raw.append(_values(self.engine.model.trainable_variables))

    def on_epoch_end(self, epoch, logs=None):
        self.judged.append(_values(self.engine.model.trainable_variables))


def _analytic(raw: list[list[np.ndarray]], m: float) -> list[list[np.ndarray]]:
    """Keras' average after each step: the first step's weights, then m x avg + (1 - m) x w (float32)."""
    m32 = np.float32(m)
    out = [raw[0]]
    for w in raw[1:]:
        out.append([m32 * a + (np.float32(1) - m32) * b for a, b in zip(out[-1], w)])
    return out


def test_the_average_follows_keras_formula_and_is_what_validation_keep_best_and_the_end_see():
    x, y = _blobs()
    model, watch, keep = _model(), Watch(), mpitrain.KeepBest("val_loss")
    common = dict(validation_data=(x[:16], y[:16]), epochs=2, batch_size=16, lr=0.1, progress=False)
    result = mpitrain.fit(model, x, y, ema=0.6, callbacks=[keep, watch], **common)
    assert len(watch.raw) == 6  # 48 rows / 16 per step, 2 epochs
    expected = _analytic(watch.raw, 0.6)
    for epoch, judged in enumerate(watch.judged):
        for a, b in zip(judged, expected[3 * epoch + 2]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(watch.raw[-1][0], expected[-1][0], atol=1e-4)  # the average is not the weights
    final = _values(model.trainable_variables)
    assert all(np.array_equal(a, b) for a, b in zip(final, watch.judged[-1]))  # the model ends averaged
    # Validation predicted with the average, not the raw weights; KeepBest's copy is the average of its epoch.
    val_x = x[:16][result.val_index]
    np.testing.assert_allclose(result.val_probs, model.predict(val_x, verbose=0), atol=1e-6)
    raw = _model()
    raw.set_weights(watch.raw[-1])
    assert not np.allclose(result.val_probs, raw.predict(val_x, verbose=0), atol=1e-4)
    best = result.kept_epoch
    np.testing.assert_array_equal(keep.best, np.concatenate([w.reshape(-1) for w in watch.judged[best - 1]]))
    # Training went on from the raw weights: the same run without --ema steps through them.
    plain = Watch()
    mpitrain.fit(_model(), x, y, callbacks=[plain], **common)
    assert all(np.array_equal(a, b) for a, b in zip(plain.raw[-1], watch.raw[-1]))


def _engine(run_dir, **options):
    x, y = _blobs()
    opts = Options(epochs=2, batch_size=16, lr=0.1, ema=0.7, checkpoint_every=1, keep_checkpoints=20, **options)
    data = InMemory(x, y, x[:16], y[:16])
    return Engine(_model(seed=5), data, opts, SingleComm(), checkpoints=True, checkpoint_dir=run_dir, progress=False)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_resumed_run_ends_bit_identical_to_the_uninterrupted_one(tmp_path, optimizer):
    kind = dict(optimizer=optimizer, momentum=0.5 if optimizer == "sgd" else 0.0)
    whole = _engine(tmp_path / "whole", **kind)
    history = whole.fit().history
    names = [p.name for p in list_checkpoints(tmp_path / "whole")]
    # Mid-epoch 2, and the end of epoch 1 (where the average was swapped in for validation).
    for name in ("ckpt-e00001-s0000001.npz", "ckpt-e00001-s0000000.npz"):
        assert name in names
        again = _engine(tmp_path / name[:-4], **kind)
        result = again.fit(read(tmp_path / "whole" / "checkpoints" / name), resuming=True)
        assert _untimed(result.history) == _untimed(history)
        for a, b in zip(_values(again.model.variables), _values(whole.model.variables)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(_values(again.optimizer.variables), _values(whole.optimizer.variables)):
            np.testing.assert_array_equal(a, b)


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")} for row in history]


def test_the_saved_model_is_the_average_and_config_json_records_it(tmp_path):
    x, y = _blobs()
    watch, run = Watch(), tmp_path / "run"
    mpitrain.fit(_model(), x, y, out=run, ema=0.5, label_smoothing=0.1, epochs=1, batch_size=16, callbacks=[watch])
    saved = keras.saving.load_model(run / runfiles.MODEL, compile=False)
    for a, b, raw in zip(_values(saved.trainable_variables), watch.judged[-1], watch.raw[-1]):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, raw)
    config = json.loads((run / runfiles.CONFIG).read_text())["config"]
    assert (config["ema"], config["label_smoothing"]) == (0.5, 0.1)


class PeerComm(SingleComm):
    """Rank 0 of 2, whose peer's buffer is `peer` (its stop vote 0): sums computed here."""

    def __init__(self, peer: np.ndarray):
        super().__init__()
        self.size, self.peer = 2, peer
        self.sizes: list[int] = []  # of every buffer summed

    def allreduce_sum_(self, buf):
        self.sizes.append(buf.size)
        buf += np.append(self.peer, np.float32(0))[: buf.size]
        return buf


def _with_state(seed, ema):
    """A model and a built optimizer whose weights and averages are random numbers of `seed`."""
    model = _model(seed)
    opt = keras.optimizers.Adam(1e-3, use_ema=ema is not None, ema_momentum=ema or 0.99)
    opt.build(model.trainable_variables)
    rng = np.random.default_rng(seed)
    for _, a in moving_averages(opt):
        a.assign(rng.normal(size=a.shape).astype(np.float32))
    return model, opt


@pytest.mark.parametrize("ema", [0.9, None])
def test_local_sgd_averages_the_averages_with_the_weights(ema):
    mine, opt = _with_state(1, ema)
    peer_model, peer_opt = _with_state(2, ema)
    peer = [*peer_model.trainable_variables, *[a for _, a in moving_averages(peer_opt)]]
    ours = [*mine.trainable_variables, *[a for _, a in moving_averages(opt)]]
    expected = [(a + b) / np.float32(2) for a, b in zip(_values(ours), _values(peer))]
    comm = PeerComm(FlatVars(peer).pack().copy())
    sync = make_sync("local-sgd", comm, 2)
    sync.attach(mine, opt)
    sync.after_step(2, 10, 16)  # a sync step: one fused average (and the stop vote)
    assert comm.sizes == [FlatVars(ours).size + 1]
    assert len(ours) == (4 if ema else 2)
    for a, b in zip(_values(ours), expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"ema": 0.0}, "--ema must be in (0, 1)"),
        ({"ema": 1.0}, "--ema must be in (0, 1)"),
        ({"ema": -0.5}, "--ema must be in (0, 1)"),
        ({"label_smoothing": 1.0}, "--label-smoothing must be in [0, 1)"),
        ({"label_smoothing": -0.1}, "--label-smoothing must be in [0, 1)"),
    ],
)
def test_out_of_range_values_are_refused_by_the_config_and_the_engine(given, message):
    for make in (TrainConfig, Options):
        with pytest.raises(UserError) as e:
            make(**given)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_master_worker_refuses_ema_in_one_line(capsys):
    from mpitrain.cli import main

    for strategy in ("allreduce", "local-sgd"):
        assert resolve(TrainConfig(strategy=strategy, ema=0.99)).ema == 0.99
    with pytest.raises(UserError, match="--ema with --strategy master-worker: the master"):
        resolve(TrainConfig(strategy="master-worker", ema=0.99))
    assert main(["train", "--strategy", "master-worker", "--ema", "0.99", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use --strategy allreduce or local-sgd" in err[0]
    assert main(["train", "--ema", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "mpitrain: error: " + _message(TrainConfig, ema=1.5)


def _message(make, **given) -> str:
    with pytest.raises(UserError) as e:
        make(**given)
    return str(e.value)


def test_a_model_with_its_own_optimizer_or_loss_is_refused():
    x, y = _blobs(16)
    own = {"optimizer": "sgd", "loss": "sparse_categorical_crossentropy"}
    with pytest.raises(UserError, match="--ema makes mpitrain's optimizer"):
        mpitrain.fit(_model(compiled=own), x, y, ema=0.9, progress=False)
    with pytest.raises(UserError, match="--label-smoothing smooths mpitrain's cross-entropy"):
        mpitrain.fit(_model(compiled={"loss": "sparse_categorical_crossentropy"}), x, y, label_smoothing=0.1)


def _cross_entropy(probs: np.ndarray, target: np.ndarray) -> float:
    """Mean cross-entropy of probabilities against target distributions (Keras' clipping)."""
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-(target * np.log(p)).sum(1).mean())


def _knowing_model():
    """A model that already tells the bands apart (confident and right), so that smoothed
    labels cost clearly more than the one-hot ones."""
    model = _model()
    kernel = np.zeros((64, 3), np.float32)
    for c in range(3):
        kernel[c * 16 : (c + 1) * 16, c] = 0.3  # rows 2c, 2c+1 of the 8x8 image: band c
    model.layers[-1].kernel.assign(kernel)
    return model


def test_label_smoothing_changes_the_training_loss_and_never_val_loss():
    x, y = _blobs(24)
    vx, vy = _blobs(16, seed=1)
    onehot = np.eye(3)[y]
    start = _knowing_model().predict(x, verbose=0)  # one step per epoch: its loss is at these weights
    losses = []
    for eps in (0.0, 0.3):
        opts = dict(validation_data=(vx, vy), epochs=1, batch_size=24, label_smoothing=eps, progress=False)
        result = mpitrain.fit(_knowing_model(), x, y, **opts)
        row = result.history[0]
        assert row["loss"] == pytest.approx(_cross_entropy(start, onehot * (1 - eps) + eps / 3), rel=1e-5)
        # val_loss is the plain cross-entropy of the validation predictions, smoothed or not.
        plain = _cross_entropy(result.val_probs, np.eye(3)[result.val_labels])
        assert row["val_loss"] == pytest.approx(plain, rel=1e-5)
        losses.append(row["loss"])
    assert losses[1] > losses[0] + 0.5  # smoothing moved the training loss
