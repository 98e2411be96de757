"""The run folder owns its names (`mpitrain.runfiles`): a run writes only listed names,
``train --overwrite`` removes every one of them (exports, tb/, val_predictions.csv,
checkpoints, ...) and nothing else, and an export whose model.keras changed since is
refused by ``evaluate``/``predict`` in one line.

Everything runs in this process (one rank), on the tiny model: a few seconds a training."""

import contextlib
import importlib.util
import io
import json
import os
import shutil
from types import SimpleNamespace

import pytest
from test_evaluate import one_line_error

from mpitrain import runfiles

pytestmark = pytest.mark.timeout(600)

TINY = ["--model", "tiny", "--image-size", 16, "--epochs", 1, "--batch-size", 8, "--threads", 1]
LITERT = any(importlib.util.find_spec(m) for m in ("ai_edge_litert", "tflite_runtime"))
OLD = 1_000_000_000  # mtime (2001) given to every file of the first run: one still that old survived


def _main(*argv) -> tuple[int, str, str]:
    from mpitrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _ok(*argv) -> str:
    code, out, err = _main(*argv)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth_data):
    """A run with everything a plain training can add (--tensorboard, an unreadable image,
    both exports, one of them outside the run), then trained again over it with --overwrite,
    without any of those extras and with another seed."""
    base = tmp_path_factory.mktemp("runfolder")
    data = base / "data"
    shutil.copytree(synth_data, data)
    (data / "NORMAL" / "broken.png").write_bytes(b"not an image")
    run, outside = base / "run", base / "shipped-tflite"
    _ok("train", "--data", data, *TINY, "--out", run, "--tensorboard")
    _ok("export", run, "--format", "savedmodel")
    if LITERT:
        _ok("export", run, "--format", "tflite")
    _ok("export", run, "--format", "tflite" if LITERT else "savedmodel", "--out", outside)
    first = sorted(p.name for p in run.iterdir())
    first_sha = runfiles.file_sha256(run / runfiles.MODEL)
    shutil.copy(run / runfiles.MODEL, base / "first-model.keras")
    (run / "notes.txt").write_text("mine")
    (run / "my-plots").mkdir()
    (run / "my-plots" / "a.png").write_text("mine")
    for p in [run, *run.rglob("*")]:
        os.utime(p, (OLD, OLD), follow_symlinks=False)
    _ok("train", "--data", synth_data, *TINY, "--seed", 7, "--out", run, "--overwrite")
    return SimpleNamespace(
        base=base,
        data=data,
        run=run,
        outside=outside,
        first=first,
        first_sha=first_sha,
        first_model=base / "first-model.keras",
    )


def test_every_name_a_run_writes_is_in_the_list_and_the_always_ones_are_there(runs):
    assert [n for n in runs.first if not runfiles.is_ours(n)] == []
    assert set(runfiles.ALWAYS) <= set(runs.first)
    extras = {runfiles.TENSORBOARD, runfiles.SKIPPED, runfiles.export_name("savedmodel")}
    assert extras <= set(runs.first)  # each option's name was produced (so the listing means something)
    assert not [n for n in runs.first if n.startswith(".")]  # the lock is released, no temporaries left
    second = sorted(p.name for p in runs.run.iterdir() if p.name not in ("notes.txt", "my-plots"))
    assert second == sorted(runfiles.ALWAYS)  # a plain run writes exactly the "always" names


def test_overwrite_leaves_no_file_of_the_old_run_and_keeps_the_users_own(runs):
    survivors = sorted(str(p.relative_to(runs.run)) for p in runs.run.rglob("*") if p.lstat().st_mtime == OLD)
    assert survivors == ["my-plots", "my-plots/a.png", "notes.txt"]
    assert (runs.run / "notes.txt").read_text() == "mine"
    for gone in (runfiles.TENSORBOARD, runfiles.SKIPPED, *runfiles.EXPORTS.values()):
        assert not (runs.run / gone).exists(), gone
    assert runfiles.file_sha256(runs.run / runfiles.MODEL) != runs.first_sha  # it is the new run's model


def test_export_json_names_the_model_it_was_made_from_by_its_sha256(runs):
    source = json.loads((runs.outside / "export.json").read_text())["source"]
    assert source["model"] == str((runs.run / runfiles.MODEL).resolve())
    assert source["model_sha256"] == runs.first_sha


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_an_export_of_a_retrained_run_is_refused_in_one_line(runs, command):
    args = [runs.data / "PNEUMONIA"] if command == "predict" else ["--data", runs.data]
    code, _, err = _main(command, "--model", runs.outside, *args)
    one_line_error(code, err, "stale", str(runs.outside), str(runs.run / runfiles.MODEL), "mpitrain export")


def test_a_current_export_stands_for_its_model_until_model_keras_is_replaced(runs, tmp_path):
    run, shipped = tmp_path / "run", tmp_path / "shipped"
    shutil.copytree(runs.run, run)
    _ok("export", run, "--format", "savedmodel", "--out", shipped)
    images = runs.data / "PNEUMONIA"
    by_run = _ok("predict", "--model", run, images)
    by_export = _ok("predict", "--model", shipped, images)
    assert by_export == by_run and by_run.count("\n") > 10  # the same rows: the same model
    said = _ok("predict", "--model", shipped, images, "--csv", tmp_path / "p.csv")
    assert f"with export {shipped} of {run / runfiles.MODEL}" in said  # what was run, in so many words
    shutil.copy(runs.first_model, run / runfiles.MODEL)  # another model under the same name
    code, _, err = _main("predict", "--model", shipped, images)
    one_line_error(code, err, "stale", str(shipped), str(run / runfiles.MODEL))


def test_an_export_from_an_older_mpitrain_cannot_be_vouched_for(runs, tmp_path):
    old = tmp_path / "old-export"
    shutil.copytree(runs.outside, old)
    doc = json.loads((old / "export.json").read_text())
    del doc["source"]["model_sha256"]
    (old / "export.json").write_text(json.dumps(doc))
    code, _, err = _main("predict", "--model", old, runs.data / "NORMAL")
    one_line_error(code, err, str(old), "does not record which model.keras", "export again")


def test_a_run_folder_moved_with_its_export_still_finds_its_model(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs.run, tmp_path / "was-here")
    _ok("export", tmp_path / "was-here", "--format", "savedmodel")  # into was-here/export-savedmodel
    (tmp_path / "was-here").rename(run)  # the path export.json recorded is gone
    exported = run / runfiles.export_name("savedmodel")
    said = _ok("predict", "--model", exported, runs.data / "PNEUMONIA", "--csv", tmp_path / "p.csv")
    assert f"with export {exported} of {run / runfiles.MODEL}" in said
