"""`mpitrain pretrain` (--pretext rotation): every image in four turns, labelled by its
turn; the run folder is an --init for a training on the labels; a stopped pre-training
resumes exactly."""

import json
import os
import signal

import numpy as np
import pytest

from mpitrain.config import TrainConfig
from mpitrain.data.dataset import Plan, Shard
from mpitrain.errors import UserError
from mpitrain.train import pretext


def test_each_row_becomes_its_four_turns_in_order():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (3, 5, 5), dtype=np.uint8)
    v = rng.integers(0, 255, (2, 5, 5, 1), dtype=np.uint8)
    shard = Shard(x, np.array([1, 0, 1]), v, np.array([0, 1]), 255.0, 255.0, val_index=np.array([7, 3]))
    out = pretext.turned(shard)
    assert out.train_x.shape == (12, 5, 5) and out.val_x.shape == (8, 5, 5, 1)
    assert out.train_y.tolist() == [0, 1, 2, 3] * 3 and out.val_y.tolist() == [0, 1, 2, 3] * 2
    for i in range(3):
        for k in range(4):
            assert np.array_equal(out.train_x[4 * i + k], np.rot90(x[i], k))
    assert np.array_equal(out.val_x[5], np.rot90(v[1], 1, axes=(0, 1)))
    assert out.val_index.tolist() == [7, 7, 7, 7, 3, 3, 3, 3]  # each turn keeps its file
    assert out.train_max == 255.0 and shard.train_x.shape == (3, 5, 5)  # the shard itself is unchanged


def test_the_plan_names_the_turns_and_counts_each_image_in_each():
    plan = Plan("d", ["NORMAL", "PNEUMONIA"], ["a", "b", "c"], np.array([0, 1, 1]), ["d"], np.array([0]), "split")
    turned = pretext.planned(plan)
    assert turned.classes == ["0", "90", "180", "270"] and turned.train_paths == plan.train_paths
    assert turned.class_counts().tolist() == [3, 3, 3, 3]  # so --class-weight balanced weighs them alike
    assert pretext.planned(turned).classes == turned.classes


def test_rotation_needs_square_images():
    with pytest.raises(UserError, match="--image-size must be square"):
        TrainConfig(pretext="rotation", image_size="64x48")
    with pytest.raises(UserError, match="--pretext must be one of"):
        TrainConfig(pretext="jigsaw")


def _run(args, capsys):
    from mpitrain.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr()


@pytest.fixture
def isolated(monkeypatch):
    from mpitrain import runtime
    from mpitrain.parallel import comm

    # What a command sets for the rest of its process: put back after the test.
    monkeypatch.setattr(comm, "_WORLD", comm._WORLD)
    monkeypatch.setattr(runtime, "_started", runtime._started)


def test_a_pretrained_run_is_an_init_for_the_labels(synth_data, tmp_path, capsys, isolated):
    common = ["--data", synth_data, "--model", "tiny", "--image-size", 16, "--epochs", 1]
    code, said = _run(["pretrain", *common, "--out", tmp_path / "pre"], capsys)
    assert code == 0, said.err
    assert "every image in 4 turns" in said.out
    config = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert config["config"]["pretext"] == "rotation"
    metrics = json.loads((tmp_path / "pre" / "metrics.json").read_text())
    assert metrics["class_names"] == ["0", "90", "180", "270"]
    assert sum(metrics["per_class_counts"].values()) == 4 * metrics["per_class_counts"]["0"]
    code, said = _run(["train", *common, "--init", tmp_path / "pre", "--out", tmp_path / "ft"], capsys)
    assert code == 0, said.err
    line = next(li for li in said.out.splitlines() if li.startswith("init: "))
    # Every layer with weights but the head (four outputs there, two here).
    assert line.endswith("(shape)") and line.count("(shape)") == 1 and "absent" not in line, line
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["config"]["pretext"] == "none"


def _checksum(run) -> str:
    return json.loads((run / "config.json").read_text())["runtime"]["checksum"]


def test_a_stopped_pretraining_resumes_exactly(synth_data, tmp_path, isolated):
    from mpitrain.train.command import train_main

    def config(out):
        return TrainConfig(
            data=str(synth_data), pretext="rotation", model="tiny", image_size=16, epochs=2, out=str(out)
        )

    assert train_main(lambda: config(tmp_path / "whole"), echo=lambda *a: None) == 0

    def stop_after_the_first_epoch(line, *_):
        if line.startswith("epoch 1/2"):
            os.kill(os.getpid(), signal.SIGUSR1)  # as a batch system would: checkpoint, then stop

    assert train_main(lambda: config(tmp_path / "stopped"), echo=stop_after_the_first_epoch) == 0
    assert not (tmp_path / "stopped" / "model.keras").exists()  # stopped before its end
    assert train_main(lambda: config(tmp_path / "stopped"), echo=lambda *a: None, resume=True) == 0
    assert _checksum(tmp_path / "stopped") == _checksum(tmp_path / "whole")
