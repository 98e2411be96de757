"""Multi-label training in the engine, in one process.

The first step's loss is the hand-computed weighted, masked binary cross-entropy (a masked
entry changes nothing, whatever its target would have been); the per-label metrics leave
masked entries out; a model learns three independent visual findings (per-label AUC near
1); wrong shapes and unsupported options are one line.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from mpitrain.engine import Engine, InMemory, Options  # noqa: E402
from mpitrain.engine import multilabel as ml  # noqa: E402
from mpitrain.engine.fit import as_labels  # noqa: E402
from mpitrain.engine.metrics import roc_auc  # noqa: E402
from mpitrain.errors import UserError  # noqa: E402
from mpitrain.parallel.comm import SingleComm  # noqa: E402
from mpitrain.shards import epoch_order  # noqa: E402

SIDE, L = 8, 3


def _model(n_out=L, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((SIDE, SIDE, 1)), keras.layers.Flatten(), keras.layers.Dense(n_out, activation="sigmoid")]
    )


def _findings(n=96, seed=0, masked=0.0):
    """Finding l lights up band l of the rows, independently of the others; a share
    `masked` of the entries is NaN (uncertain, ignored)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, L)) < 0.4).astype(np.float32)
    x = rng.random((n, SIDE, SIDE, 1)).astype(np.float32) * 0.2
    for lab in range(L):
        x[y[:, lab] == 1, 2 * lab : 2 * lab + 2] += 0.8
    y[rng.random((n, L)) < masked] = np.nan
    return x, y


def _bce(t, p):
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def test_targets_give_masked_entries_weight_zero():
    y = np.array([[1, 0, np.nan], [np.nan, 1, 0]], np.float32)
    w = np.array([[0.5, 0.7, 0.9], [2.0, 3.0, 4.0]], np.float32)  # negatives, positives
    t, wt = ml.targets(y, w)
    np.testing.assert_array_equal(t, [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(wt, [[2.0, 0.7, 0.0], [0.0, 3.0, 0.9]])


def test_the_first_loss_is_the_weighted_masked_binary_cross_entropy():
    x, y = _findings(24, masked=0.25)
    weights = np.array([[1.0, 0.5, 2.0], [3.0, 1.5, 0.25]], np.float32)
    seed = 3
    order = epoch_order(24, seed, 0, 0)
    start = np.asarray(_model()(x[order]))
    t, w = ml.targets(y[order], weights)
    expected = (w * _bce(t, start)).sum() / L / 24
    known = ~np.isnan(y[order])
    right = ((start >= 0.5) == (t > 0.5)) & known
    label_acc = (right.sum(1) / known.sum(1)).mean()

    opts = Options(epochs=1, batch_size=24, lr=0.1, seed=seed)
    engine = Engine(_model(), InMemory(x, y, x[:12], y[:12]), opts, SingleComm(), class_weight=weights, progress=False)
    row = engine.fit().history[0]
    assert row["loss"] == pytest.approx(expected, rel=1e-5)
    assert row["accuracy"] == pytest.approx(label_acc, rel=1e-6)
    assert row["mean_auc"] == row["auc"] and "val_mean_auc" in row


def test_a_label_masked_everywhere_is_never_trained():
    x, y = _findings(32)
    y[:, 2] = np.nan  # every entry of the third finding uncertain and ignored
    model = _model()
    before = [w.copy() for w in model.get_weights()]
    Engine(
        model, InMemory(x, y, x[:8], y[:8]), Options(epochs=2, batch_size=8, lr=0.1), SingleComm(), progress=False
    ).fit()
    kernel, bias = model.get_weights()
    np.testing.assert_array_equal(kernel[:, 2], before[0][:, 2])  # no gradient reached its unit
    assert bias[2] == before[1][2]
    assert not np.array_equal(kernel[:, 0], before[0][:, 0])  # the others trained


def test_per_label_metrics_leave_masked_entries_out():
    rng = np.random.default_rng(1)
    y = (rng.random((50, 2)) < 0.5).astype(np.float64)
    p = rng.random((50, 2))
    y[:10, 0] = np.nan
    m = ml.multilabel_metrics(y, p, ["a", "b"])
    assert m["per_label"]["a"]["roc_auc"] == pytest.approx(roc_auc(y[10:, 0] > 0.5, p[10:, 0]))
    assert m["per_label"]["a"]["masked"] == 10
    assert m["per_label"]["a"]["positives"] + m["per_label"]["a"]["negatives"] == 40
    assert m["per_label"]["b"]["prevalence"] == pytest.approx(y[:, 1].mean())
    assert m["mean_roc_auc"] == pytest.approx((m["per_label"]["a"]["roc_auc"] + m["per_label"]["b"]["roc_auc"]) / 2)
    sens = ((p[10:, 0] >= 0.5) & (y[10:, 0] == 1)).sum() / (y[10:, 0] == 1).sum()
    assert m["per_label"]["a"]["sensitivity"] == pytest.approx(sens)
    n, loss, acc = ml.sums(y, p)
    assert n == 50 and loss == pytest.approx(np.nansum(_bce(np.nan_to_num(y), p) * ~np.isnan(y)) / 2)


def test_three_independent_findings_are_learnt():
    x, y = _findings(240, masked=0.1)
    vx, vy = _findings(120, seed=1)
    engine = Engine(
        _model(), InMemory(x, y, vx, vy), Options(epochs=8, batch_size=16, lr=0.05), SingleComm(), progress=False
    )
    result = engine.fit()
    m = ml.multilabel_metrics(result.val_labels, result.val_probs, ["a", "b", "c"])
    assert all(v["roc_auc"] > 0.95 for v in m["per_label"].values()), m["per_label"]
    assert result.history[-1]["val_mean_auc"] == pytest.approx(m["mean_roc_auc"])


def test_labels_as_a_table_are_multi_label_and_a_column_is_not():
    assert as_labels(np.zeros((4, 3))).dtype == np.float32 and as_labels(np.zeros((4, 3))).shape == (4, 3)
    assert as_labels(np.zeros((4, 1))).shape == (4,) and as_labels(np.zeros((4, 1))).dtype == np.int32


@pytest.mark.parametrize(
    "model, options, message",
    [
        (lambda: _model(n_out=2), {}, "2 output(s) and the data 3 label(s)"),
        (lambda: _model(), {"mixup": 0.4}, "--mixup and --label-smoothing"),
        (lambda: _model(), {"label_smoothing": 0.1}, "--mixup and --label-smoothing"),
    ],
)
def test_refusals_are_one_line(model, options, message):
    x, y = _findings(16)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Engine(model(), InMemory(x, y, x, y), Options(epochs=1, batch_size=8, **options), SingleComm(), progress=False)


def test_keep_best_val_mean_auc_keeps_the_best_epoch_and_needs_multi_label():
    from blobs import blobs, tiny_model
    from mpitrain.engine.callbacks.keep_best import KeepBest
    from mpitrain.engine.epochs import best_epoch

    x, y = _findings(64)
    vx, vy = _findings(32, seed=2)
    engine = Engine(
        _model(),
        InMemory(x, y, vx, vy),
        Options(epochs=4, batch_size=16, lr=0.05),
        SingleComm(),
        callbacks=[KeepBest("val_mean_auc")],
        progress=False,
    )
    result = engine.fit()
    assert result.kept_epoch == best_epoch(result.history, "val_mean_auc")
    bx, by = blobs(16)
    single = Engine(
        tiny_model(),
        InMemory(bx, by, bx, by),
        Options(epochs=1, batch_size=8),
        SingleComm(),
        callbacks=[KeepBest("val_mean_auc")],
        progress=False,
    )
    with pytest.raises(UserError, match="is for multi-label data"):
        single.fit()


def test_a_resumed_multi_label_run_ends_bit_identical_to_the_uninterrupted_one(tmp_path):
    from mpitrain.engine.checkpoint import list_checkpoints, read

    x, y = _findings(48, masked=0.2)

    def engine(folder):
        opts = Options(epochs=2, batch_size=16, lr=0.1, checkpoint_every=1, keep_checkpoints=20)
        weights = np.array([[1.0, 0.5, 2.0], [3.0, 1.5, 0.25]], np.float32)
        return Engine(
            _model(seed=5),
            InMemory(x, y, x[:16], y[:16]),
            opts,
            SingleComm(),
            class_weight=weights,
            checkpoints=True,
            checkpoint_dir=folder,
            progress=False,
        )

    whole = engine(tmp_path / "whole")
    history = whole.fit().history
    name = "ckpt-e00001-s0000001.npz"  # mid-epoch 2
    assert name in [p.name for p in list_checkpoints(tmp_path / "whole")]
    again = engine(tmp_path / "again")
    result = again.fit(read(tmp_path / "whole" / "checkpoints" / name), resuming=True)
    partial = {"auc", "balanced_accuracy", "mean_auc"}  # of epoch 2: over its steps after the checkpoint only

    def untimed(rows):
        return [
            {
                k: v
                for k, v in r.items()
                if k not in {"seconds", "images_per_second"} and not (r["epoch"] == 2 and k in partial)
            }
            for r in rows
        ]

    assert untimed(result.history) == untimed(history)
    for a, b in zip(again.model.get_weights(), whole.model.get_weights()):
        np.testing.assert_array_equal(a, b)
