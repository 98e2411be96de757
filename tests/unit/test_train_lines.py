"""What `mpitrain train` says at its start and end: the data lines fit 150 columns, and the
run ends with its wall time, as `evaluate` does."""

import re
from types import SimpleNamespace

import numpy as np

from mpitrain.config import TrainConfig
from mpitrain.data.groups import Groups
from mpitrain.train.command import data_lines, time_line, train_main


def _xray_plan(root: str):
    # The chest X-ray folder's plan as the recipe makes it (5,216 images, patient groups).
    groups = Groups(
        ids=np.zeros(5216, np.int64),
        n_groups=2846,
        matched=5216,
        duplicate_sets=24,
        duplicate_files=50,
        source="filename-patient",
    )
    return SimpleNamespace(
        data_dir=root,
        classes=["NORMAL", "PNEUMONIA"],
        train_paths=["p"] * 4694,
        val_paths=["p"] * 522,
        val_from="split",
        grouping=groups.describe(),
    )


def test_the_xray_runs_data_lines_fit_150_columns_and_say_everything():
    plan = _xray_plan("/work/shared/data/chest_xray/train")
    cfg = TrainConfig.with_recipe(recipe="xray", data=plan.data_dir)
    lines = data_lines(cfg, plan, channels=1)
    assert all(len(line) <= 150 for line in lines), [len(line) for line in lines]
    text = "\n".join(lines)
    for fact in (plan.data_dir, "NORMAL, PNEUMONIA", "4694 train / 522 val", "split 0.1", plan.grouping, "1 channel"):
        assert fact in text, fact


def test_an_ungrouped_run_has_no_grouped_line():
    plan = SimpleNamespace(**{**vars(_xray_plan("d")), "grouping": ""})
    assert not any(line.startswith("grouped") for line in data_lines(TrainConfig(data="d"), plan, 1))


def test_the_time_line_names_the_total_and_its_parts():
    line = time_line(12.34, 1.5, 8.25, 2)
    assert line.startswith("time: 12.3s since the command started (starting the ranks")
    assert "1.5s loading images" in line and "8.2s training" in line


def test_a_training_ends_with_its_wall_time(synth_data, tmp_path, monkeypatch):
    from mpitrain import runtime
    from mpitrain.parallel import comm

    # What a training sets for the rest of its process: put back after the test.
    monkeypatch.setattr(comm, "_WORLD", comm._WORLD)
    monkeypatch.setattr(runtime, "_started", runtime._started)
    said: list[str] = []
    cfg = TrainConfig(data=str(synth_data), model="tiny", image_size=16, epochs=1, out=str(tmp_path / "run"))
    assert train_main(lambda: cfg, echo=said.append) == 0
    last = re.fullmatch(r"time: ([\d.]+)s since the command started .* ([\d.]+)s training", said[-1])
    assert last is not None, said[-3:]
    assert float(last.group(1)) >= float(last.group(2)) > 0
