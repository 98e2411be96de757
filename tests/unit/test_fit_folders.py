"""`mpitrain.fit` on folders, label files and run folders (one process, in-process).

The library's second road: `mpitrain train`'s pipeline with the caller's model. What a run
folder written by `fit(..., out=)` must be (what `mpitrain evaluate` and `predict` read), a
resume that lands on the uninterrupted run's weights, augmentation on arrays, and the
one-line mistakes.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import keras
import numpy as np
import pytest

import mpitrain
from mpitrain import runfiles
from mpitrain.cli import main
from mpitrain.errors import UserError


def _model(outputs: int = 2, size: int = 16, seed: int = 0, compiled: bool = False):
    keras.utils.set_random_seed(seed)  # the same initial weights for the runs compared
    model = keras.Sequential(
        [keras.Input((size, size, 1)), keras.layers.Flatten(), keras.layers.Dense(outputs, activation="softmax")]
    )
    if compiled:
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    return model


def _weights(model) -> list[np.ndarray]:
    return [np.array(w) for w in model.get_weights()]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _arrays(n: int = 96, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int32)
    x = rng.random((n, size, size, 1), dtype=np.float32) * 0.5
    x[y == 1, : size // 2] += 0.5  # class 1: a bright top half
    return x, y


def test_fit_on_a_folder_writes_the_run_folder_evaluate_and_predict_read(synth_data, tmp_path, capsys):
    run = tmp_path / "run"
    model = _model()
    result = mpitrain.fit(model, str(synth_data), out=run, epochs=2, batch_size=16, progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2]
    for name in runfiles.ALWAYS:
        assert (run / name).exists(), name
    doc = json.loads((run / runfiles.CONFIG).read_text())
    assert doc["config"]["model"] == "mpitrain.fit:" + model.name
    assert doc["config"]["data"] == str(synth_data) and doc["config"]["image_size"] == 16
    assert doc["runtime"]["library"]["trained_by"] == "mpitrain.fit"
    assert doc["runtime"]["classes"] == ["NORMAL", "PNEUMONIA"]
    # model.keras is the caller's model as trained, and `evaluate` / `predict` take the folder.
    saved = keras.saving.load_model(run / runfiles.MODEL, compile=False)
    assert _same(_weights(saved), _weights(model))
    assert main(["evaluate", "--model", str(run), "--data", str(synth_data), "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["class_names"] == ["NORMAL", "PNEUMONIA"] and evaluated["n_samples"] == 80
    assert main(["predict", "--model", str(run), str(next(synth_data.rglob("*.png")))]) == 0


def test_a_model_of_oblong_images_reads_the_folder_at_its_shape(synth_data, tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((16, 24, 1)), keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")]
    )
    mpitrain.fit(model, synth_data, out=tmp_path / "run", batch_size=16, progress=False)
    assert json.loads((tmp_path / "run" / runfiles.MODEL_INFO).read_text())["image_size"] == "24x16"  # W x H
    assert main(["predict", "--model", str(tmp_path / "run"), str(next(synth_data.rglob("*.png")))]) == 0


def test_fit_on_a_label_csv_takes_its_classes_and_writes_nothing_without_out(synth_data, tmp_path):
    table = tmp_path / "labels.csv"
    files = sorted(synth_data.rglob("*.png"))
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "finding"])
        for p in files:
            writer.writerow([str(p), "sick" if p.parent.name == "PNEUMONIA" else "healthy"])
    before = set(tmp_path.iterdir())
    result = mpitrain.fit(
        _model(), table, path_column="file", label_column="finding", epochs=1, batch_size=16, progress=False
    )
    assert len(result.history) == 1 and result.history[0]["val_loss"] > 0
    assert set(tmp_path.iterdir()) == before  # no run folder asked for, none written
    run = tmp_path / "run"
    mpitrain.fit(_model(), table, path_column="file", label_column="finding", out=run, progress=False)
    assert json.loads((run / runfiles.MODEL_INFO).read_text())["classes"] == ["healthy", "sick"]


class _CtrlC(mpitrain.Callback):
    """Ctrl-C in epoch 2's fourth step, after the checkpoint of its second (checkpoint_every=2)."""

    def on_train_batch_end(self, batch, logs=None):
        if len(self.engine.history) == 1 and batch == 3:
            raise KeyboardInterrupt


def test_resume_true_continues_to_the_weights_of_the_uninterrupted_run(synth_data, tmp_path, capsys):
    common = dict(epochs=3, batch_size=8, checkpoint_every=2, progress=False)
    whole = _model(compiled=True)
    mpitrain.fit(whole, synth_data, out=tmp_path / "whole", **common)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        mpitrain.fit(_model(compiled=True), synth_data, out=run, callbacks=[_CtrlC()], **common)
    said = capsys.readouterr().err
    assert "resume=True" in said and "ckpt-e00001-s0000002" in said  # epoch 2, step 2: where it goes on
    assert not (run / runfiles.MODEL).exists()
    # The command line cannot build the script's model again: it says so in one line.
    assert main(["train", "--resume", "--out", str(run)]) == 2
    assert "mpitrain.fit" in capsys.readouterr().err
    resumed = _model(compiled=True, seed=7)  # other initial weights: the checkpoint's replace them
    result = mpitrain.fit(resumed, synth_data, out=run, resume=True, progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert _same(_weights(resumed), _weights(whole))
    with pytest.raises(UserError, match="already finished"):
        mpitrain.fit(_model(compiled=True), synth_data, resume=run)


def test_augment_xray_on_arrays_changes_training_and_repeats_for_a_seed():
    x, y = _arrays()

    def trained(**kw):
        model = _model()
        mpitrain.fit(model, x, y, epochs=2, batch_size=16, lr=1e-2, progress=False, **kw)
        return _weights(model)

    plain, xray, again = trained(), trained(augment="xray"), trained(augment="xray")
    assert not _same(plain, xray)
    assert _same(xray, again)
    assert not _same(xray, trained(augment="xray", seed=1))
    calls = []

    def mine(rows, max_value, epoch, rank, step):  # a function of the caller's: the engine's signature
        calls.append((epoch, step))
        return rows.astype(np.float32) / max_value

    assert _same(trained(augment=mine), plain)  # the identity, called once per step
    assert calls == [(e, s) for e in range(2) for s in range(6)]


def test_arrays_with_a_run_folder_train_as_without_one(tmp_path):
    # out= takes the pipeline's road, whose arrays shard and train exactly as the engine's.
    x, y = _arrays()
    common = dict(validation_data=(x[:32], y[:32]), epochs=2, batch_size=16, progress=False)
    alone, with_run, elastic = _model(), _model(), _model()
    mpitrain.fit(alone, x, y, **common)
    mpitrain.fit(with_run, x, y, out=tmp_path / "run", classes=["dark", "bright"], **common)
    mpitrain.fit(elastic, x, y, elastic=True, **common)  # one process: nobody to lose, nothing changes
    assert _same(_weights(alone), _weights(with_run)) and _same(_weights(alone), _weights(elastic))
    info = json.loads((tmp_path / "run" / runfiles.MODEL_INFO).read_text())
    assert info["classes"] == ["dark", "bright"] and info["image_size"] == 16
    rows = list(csv.DictReader(open(tmp_path / "run" / runfiles.VAL_PREDICTIONS)))
    assert len(rows) == 32 and rows[0]["path"] == "validation_data[0]"


def test_a_validation_split_of_arrays_holds_out_rows():
    x, y = _arrays()
    result = mpitrain.fit(_model(), x, y, val_split=0.25, epochs=1, batch_size=16, progress=False)
    assert len(result.val_labels) == 24  # a quarter of 96, stratified


@pytest.mark.parametrize(
    "call, says",
    [
        (lambda d, t: mpitrain.fit(_model(), d, epocs=2), None),  # TypeError, below
        (lambda d, t: mpitrain.fit(_model(), t / "nowhere"), "no such folder or label file"),
        (lambda d, t: mpitrain.fit(_model(), d, out=t), "pass overwrite=True"),
        (
            lambda d, t: mpitrain.fit(_model(), d, image_size=24),
            "image_size=24 and channels=1, but the model takes 16x16 (width x height) with 1",
        ),
        (lambda d, t: mpitrain.fit(_model(3), d), "the model gives 3 output(s) per image"),
        (lambda d, t: mpitrain.fit(_model(), d, np.zeros(3)), "y= goes with arrays"),
        (lambda d, t: mpitrain.fit(_model(), d, resume=True), "resume=True needs out=RUNDIR"),
        (lambda d, t: mpitrain.fit(_model(), d, val_split=1.5), "val_split= must be in [0, 1)"),
        (lambda d, t: mpitrain.fit(_model(), d, augment="flip"), "augment= must be one of"),
        (lambda d, t: mpitrain.fit(_model(), *_arrays(), image_size=16), "image_size= is for a folder"),
        (lambda d, t: mpitrain.fit(_model(), *_arrays(size=8)), "images of shape (8, 8, 1)"),
        (lambda d, t: mpitrain.fit(_model(), *_arrays(), out=t / "r", class_weight={0: 2.0}), "'balanced' or 'none'"),
    ],
    ids=[
        "unknown",
        "missing",
        "occupied",
        "size",
        "classes",
        "y",
        "resume",
        "split",
        "augment",
        "arrays-size",
        "arrays-shape",
        "class-weight",
    ],  # fmt: skip
)
def test_mistakes_are_one_line(synth_data, tmp_path, call, says):
    (tmp_path / "something").write_text("not a run")
    if says is None:
        with pytest.raises(TypeError, match="unknown option"):
            call(synth_data, tmp_path)
        return
    with pytest.raises(UserError) as e:
        call(synth_data, tmp_path)
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert "--" not in str(e.value), "the library's messages name keywords, not options"


def test_every_option_of_train_is_a_keyword_or_said_not_to_be():
    # A new TrainConfig field must be decided on: a keyword of fit, or one the caller's model
    # or x makes pointless (mpitrain/api.py's NOT_KEYWORDS).
    from mpitrain import api
    from mpitrain.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields <= api.KEYWORDS | api.NAMED | api.NOT_KEYWORDS
    assert not (api.KEYWORDS | api.NAMED) & api.NOT_KEYWORDS
