"""--keep-best / --early-stop pieces: the best epoch, its weights in checkpoints, config; batch
norm on an empty batch."""

from __future__ import annotations

import numpy as np
import pytest

from mpitrain.config import KEEP_BEST_METRICS, TrainConfig
from mpitrain.engine import checkpoint as ck
from mpitrain.engine.epochs import best_epoch
from mpitrain.errors import UserError


def _rows(**series):
    n = len(next(iter(series.values())))
    return [{"epoch": e + 1, **{k: v[e] for k, v in series.items()}} for e in range(n)]


def test_best_epoch_minimises_loss_maximises_the_rest_and_keeps_the_earliest_tie():
    rows = _rows(
        val_loss=[0.5, 0.3, 0.3, 0.4], val_auc=[0.8, 0.9, 0.95, 0.95], val_accuracy=[None, 0.7, float("nan"), 0.6]
    )
    assert best_epoch(rows, "val_loss") == 2
    assert best_epoch(rows, "val_auc") == 3
    assert best_epoch(rows, "val_accuracy") == 2  # None and NaN are never best
    assert best_epoch(_rows(val_auc=[None, None]), "val_auc") is None
    assert best_epoch([], "val_loss") is None


def test_every_keep_best_metric_is_a_column_of_the_epoch_row():
    from mpitrain.engine.epochs import epoch_metrics
    from mpitrain.parallel.comm import world

    m, _, _ = epoch_metrics(
        world(),
        np.array([4.0, 2.0, 3.0]),
        np.array([[0.9, 0.1], [0.2, 0.8]] * 2, np.float32),
        np.array([0, 1, 1, 0]),
        2,
    )
    multi, _, _ = epoch_metrics(
        world(),
        np.array([4.0, 2.0, 3.0]),
        np.array([[0.9, 0.1], [0.2, 0.8]] * 2, np.float32),
        np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32),
        2,
        multi_label=True,
    )
    # val_mean_auc is multi-label's (KeepBest refuses it for one label per image).
    assert {k[len("val_") :] for k in KEEP_BEST_METRICS if k != "val_mean_auc"} <= set(m)
    assert {k[len("val_") :] for k in KEEP_BEST_METRICS} <= set(multi)


def test_checkpoint_carries_the_best_weights_exactly(tmp_path):
    best = np.random.default_rng(0).random(17).astype(np.float32)
    c = ck.Checkpoint(
        epoch=3, step=0, ranks=2, strategy="allreduce", states=[[np.zeros(2)]], shared=True, best=best, best_epoch=2
    )
    got = ck.read(ck.save(tmp_path, c))
    assert got.best_epoch == 2 and got.best.dtype == np.float32 and np.array_equal(got.best, best)
    plain = ck.read(
        ck.save(tmp_path / "b", ck.Checkpoint(epoch=1, step=0, ranks=1, strategy="allreduce", states=[[np.zeros(2)]]))
    )
    assert plain.best is None and plain.best_epoch is None


def test_config_checks_and_the_watched_metric():
    assert TrainConfig().watch_metric is None
    assert TrainConfig(early_stop=3).watch_metric == "val_loss"
    assert TrainConfig(keep_best="val_auc", early_stop=3).watch_metric == "val_auc"
    for bad in ({"keep_best": "auc"}, {"early_stop": 0}, {"augment": "heavy"}):
        with pytest.raises(UserError):
            TrainConfig(**bad)
    cfg = TrainConfig(augment="xray", groups="filename-patient", keep_best="val_balanced_accuracy", early_stop=4)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    for k in ("augment", "groups", "group_pattern", "keep_best", "early_stop"):
        del old[k]
    assert TrainConfig.from_dict(old) == TrainConfig()  # configs saved before these options


def test_cli_options_reach_the_config():
    from mpitrain.cli import _config_from_args, build_parser

    args = build_parser().parse_args(
        ["train", "--augment", "xray", "--group-pattern", r"(p\d+)_", "--keep-best", "val_auc", "--early-stop", "3"]
    )
    cfg = _config_from_args(args)
    assert (cfg.augment, cfg.groups, cfg.group_pattern, cfg.keep_best, cfg.early_stop) == (
        "xray",
        "none",
        r"(p\d+)_",
        "val_auc",
        3,
    )


def test_batch_norm_model_skips_an_empty_batch():
    """A rank whose shard ran out takes an empty last batch; batch norm must not break."""
    import keras

    from mpitrain.engine.steps import make_train_step
    from mpitrain.train.models import build_model

    model = build_model("xray", 16, 2)
    opt = keras.optimizers.Adam(1e-3)
    opt.build(model.trainable_variables)
    step = make_train_step(model, opt)
    before = [v.numpy().copy() for v in model.non_trainable_weights]
    stats, probs = step(
        np.zeros((0, 16, 16, 1), np.float32), np.zeros(0, np.int32), np.zeros(0, np.float32), np.float32(1e-3)
    )
    assert stats.numpy().tolist() == [0.0, 0.0, 0.0] and probs.shape == (0, 2)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.non_trainable_weights))
    x = np.random.default_rng(0).random((4, 16, 16, 1), dtype=np.float32)
    stats, _ = step(x, np.array([0, 1, 0, 1], np.int32), np.ones(4, np.float32), np.float32(1e-3))
    assert stats.numpy()[0] == 4
    assert not all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.non_trainable_weights))


@pytest.mark.parametrize(
    ("losses", "patience", "stops_after"),
    [
        ([0.9, 0.5, 0.6, 0.7, 0.8, 0.9], 2, 4),  # best at 2: epochs 3 and 4 without a better one
        ([0.9, 0.5, 0.6, 0.7, 0.8, 0.9], 3, 5),
        ([0.9, 0.5, 0.5, 0.5, 0.4, 0.3], 2, 4),  # a tie is not better: the earliest best stays
        ([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 1, None),  # always better: never
        ([0.9, 0.5, 0.6, 0.7, 0.8, 0.9], 4, None),  # patience runs out only at the last epoch
        ([0.9, 0.5, 0.6, 0.7, 0.8, 0.9], 1, 3),
    ],
)
def test_early_stopping_ends_exactly_patience_epochs_after_the_best(losses, patience, stops_after):
    from types import SimpleNamespace

    from mpitrain.engine.callbacks.early_stopping import EarlyStopping

    said = []
    engine = SimpleNamespace(history=[], options=SimpleNamespace(epochs=len(losses)), stop_training=False)
    engine.echo = said.append
    stop = EarlyStopping("val_loss", patience=patience)
    stop.set_engine(engine)
    stopped = None
    for epoch, loss in enumerate(losses):
        engine.history.append({"epoch": epoch + 1, "val_loss": loss})
        stop.on_epoch_end(epoch)
        if engine.stop_training:
            stopped = epoch + 1
            break
    assert stopped == stops_after
    assert len(said) == (stopped is not None)
