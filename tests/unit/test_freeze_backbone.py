"""FreezeBackbone: the head alone for the first epochs (backbone and its batch-norm statistics
fixed), then every layer at a lower rate with a fresh optimizer; resumed runs train alike."""

import numpy as np
import pytest

import mpitrain
from mpitrain.engine.callbacks.freeze_backbone import backbone_layers

SIDE = 8


def _model(seed=0):
    """A nested backbone (conv, batch norm) and a softmax head, as `--model resnet50` is built."""
    import keras

    keras.utils.set_random_seed(seed)
    inside = keras.Input((SIDE, SIDE, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inside)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU()(h)
    backbone = keras.Model(inside, keras.layers.GlobalAveragePooling2D()(h), name="backbone")
    inputs = keras.Input((SIDE, SIDE, 3))
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(backbone(inputs))
    return keras.Model(inputs, outputs)


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, SIDE, SIDE, 3), dtype=np.float32)
    y = (x[..., 0].mean(axis=(1, 2)) > x[..., 1].mean(axis=(1, 2))).astype(np.int32)
    return x, y


def _values(layer) -> list[np.ndarray]:
    return [np.array(w) for w in layer.get_weights()]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


class Watch(mpitrain.Callback):
    """After FreezeBackbone in the list: what each epoch begins with, and what it ends with."""

    def __init__(self, model):
        self.model, self.began, self.ended = model, [], []

    def on_epoch_begin(self, epoch, logs=None):
        opt = self.engine.optimizer
        slots = [np.array(v) for v in opt.variables if v.name not in ("iteration", "learning_rate")]
        self.began.append((int(opt.iterations), len(self.model.trainable_variables), slots))

    def on_epoch_end(self, epoch, logs=None):
        self.ended.append((_values(self.model.get_layer("backbone")), _values(self.model.get_layer("head"))))


OPTIONS = dict(epochs=3, batch_size=16, lr=1e-2, lr_schedule="constant", lr_scaling="none", progress=False)


def test_the_head_trains_alone_then_every_layer_at_the_lower_rate():
    model = _model()
    x, y = _data()
    start = _values(model.get_layer("backbone")), _values(model.get_layer("head"))
    watch = Watch(model)
    result = mpitrain.fit(
        model, x, y, validation_data=(x[:16], y[:16]), callbacks=[mpitrain.FreezeBackbone(2), watch], **OPTIONS
    )
    (bb1, head1), (bb2, head2), (bb3, _) = watch.ended
    # Frozen: conv kernel, batch-norm scale, offset and moving statistics all as they were.
    assert _same(bb1, start[0]) and _same(bb2, start[0])
    assert not _same(head1, start[1]) and not _same(head2, head1)
    moving = [w.name for w in model.get_layer("backbone").get_layer("bn").weights].index("moving_mean")
    assert all(not np.array_equal(a, b) for a, b in zip(bb3, start[0], strict=True)), "every backbone weight trains"
    assert not np.array_equal(bb3[1 + moving], start[0][1 + moving])  # batch norm in training mode again
    assert [row["lr"] for row in result.history] == pytest.approx([1e-2, 1e-2, 1e-3], rel=1e-6)
    steps = 3  # 48 rows / 16
    (it1, n1, _), (it2, n2, _), (it3, n3, slots3) = watch.began
    assert (n1, n2, n3) == (2, 2, 2 + 3)  # head kernel and bias; then conv, gamma and beta too
    assert (it1, it2, it3) == (0, steps, 0)  # the optimizer starts afresh when everything trains
    assert all(not s.any() for s in slots3)
    assert len(model.trainable_variables) == 5  # given back as it was


def test_a_layer_frozen_by_the_caller_stays_frozen():
    model = _model()
    model.get_layer("backbone").get_layer("bn").trainable = False
    x, y = _data()
    bn = _values(model.get_layer("backbone").get_layer("bn"))
    conv = _values(model.get_layer("backbone").get_layer("conv"))
    mpitrain.fit(model, x, y, validation_data=(x[:16], y[:16]), callbacks=[mpitrain.FreezeBackbone(1)], **OPTIONS)
    assert _same(_values(model.get_layer("backbone").get_layer("bn")), bn)
    assert not _same(_values(model.get_layer("backbone").get_layer("conv")), conv)
    assert not model.get_layer("backbone").get_layer("bn").trainable and model.get_layer("backbone").trainable


def test_the_models_own_optimizer_is_lowered_and_a_schedule_is_refused():
    import keras

    x, y = _data()
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(4e-3), loss="sparse_categorical_crossentropy")
    options = {k: v for k, v in OPTIONS.items() if k != "lr"}
    result = mpitrain.fit(
        model, x, y, validation_data=(x[:16], y[:16]), callbacks=[mpitrain.FreezeBackbone(1, lr_factor=0.25)], **options
    )
    assert [row["lr"] for row in result.history] == pytest.approx([4e-3, 1e-3, 1e-3], rel=1e-6)
    model = _model()
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.9)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="schedule of its own"):
        mpitrain.fit(model, x, y, validation_data=(x[:16], y[:16]), callbacks=[mpitrain.FreezeBackbone(1)], **options)


def test_which_layers_are_the_backbone():
    import keras

    model = _model()
    assert backbone_layers(model) == [model.get_layer("backbone")]
    plain = keras.Sequential(
        [keras.Input((SIDE, SIDE, 1)), keras.layers.Conv2D(2, 3, name="c1"), keras.layers.BatchNormalization(name="b1")]
        + [keras.layers.Flatten(), keras.layers.Dense(2, name="out")]
    )
    assert [layer.name for layer in backbone_layers(plain)] == ["c1", "b1"]  # all but the head
    assert [layer.name for layer in backbone_layers(plain, "c1")] == ["c1"]
    head_only = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="nothing to freeze"):
        backbone_layers(head_only)
    with pytest.raises(ValueError):
        backbone_layers(plain, "no_such_layer")
    with pytest.raises(ValueError, match="lr_factor"):
        mpitrain.FreezeBackbone(1, lr_factor=0.0)


def test_what_the_strategies_average_leaves_frozen_layers_out():
    import keras

    from mpitrain.parallel.comm import SingleComm
    from mpitrain.parallel.strategies import make_sync

    model = _model()
    opt = keras.optimizers.Adam()
    sync = make_sync("allreduce", SingleComm())
    sync.attach(model, opt)
    assert [v.name for v in sync.statistics] == ["moving_mean", "moving_variance"]
    assert len(sync.trained) == len(model.weights)
    model.get_layer("backbone").trainable = False
    sync.attach(model, opt)
    assert sync.statistics == [] and [v.name for v in sync.trained] == ["kernel", "bias"]  # the head's
    assert len(sync.weights.variables) == len(model.weights)  # the checksum still covers every weight


@pytest.mark.parametrize("at", [(0, 2), (1, 0), (1, 1), (2, 0)], ids=["frozen-mid", "switch", "after-mid", "after"])
def test_a_resumed_run_ends_as_the_uninterrupted_one(tmp_path, at):
    # Checkpoints in the frozen epoch, at the switch, and after it: resumed from any of them
    # the run ends with the same bits (what trains follows from the epoch number, and the
    # optimizer's fresh start is in the checkpoints written after it).
    from mpitrain import Engine, InMemory, Options
    from mpitrain.engine import checkpoint

    x, y = _data()
    rows = InMemory(x, y, x[:16], y[:16])
    opts = Options(epochs=3, batch_size=16, lr=1e-2, lr_schedule="cosine", checkpoint_every=1, keep_checkpoints=99)

    def engine(model, folder):
        return Engine(
            model,
            rows,
            opts,
            callbacks=[mpitrain.FreezeBackbone(1, lr_factor=0.5)],
            progress=False,
            checkpoints=True,
            checkpoint_dir=folder,
        )

    whole = _model()
    engine(whole, tmp_path / "whole").fit()
    epoch, step = at
    ckpt = checkpoint.read(checkpoint.folder_of(tmp_path / "whole") / f"ckpt-e{epoch:05d}-s{step:07d}.npz")
    resumed = _model(seed=9)  # other initial weights: all of them come from the checkpoint
    engine(resumed, tmp_path / "resumed").fit(ckpt, resuming=True)
    assert _same(_values(resumed), _values(whole))
