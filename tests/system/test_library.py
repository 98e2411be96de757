"""A script written against the public API, in one process and under a real mpiexec."""

import json
import subprocess
import sys

import pytest

from mpirun import mpirun, script


def _results(stdout: str) -> list[dict]:
    rows = [json.loads(line[len("RESULT ") :]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    return sorted(rows, key=lambda r: r["rank"])


def test_the_same_script_runs_alone_as_one_rank():
    # mpitrain.fit alone, in a process of its own; fit on a tf.data Dataset and allreduce /
    # broadcast in one process are proved by tests/unit/test_engine.py
    # (test_fit_takes_a_pydataset_or_a_tf_data_dataset_as_the_arrays_it_holds,
    # test_allreduce_and_broadcast_in_one_process_hand_back_the_same_kinds).
    alone = subprocess.run(script("library_script.py"), capture_output=True, text=True, timeout=180)
    assert alone.returncode == 0, alone.stderr[-3000:]
    (one,) = _results(alone.stdout)
    assert (one["rank"], one["size"], one["rank_mean"]) == (0, 1, 0.0)


@pytest.mark.parametrize("mode", ["", "--dataset", "--loop"], ids=["fit", "fit-tf-data", "gradient-tape"])
def test_the_same_script_runs_under_mpiexec_with_identical_weights_on_every_rank(mode):
    args, loop = [mode] if mode else [], mode == "--loop"
    proc, _ = mpirun(2, script("library_script.py", *args), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_weights_on_both_ranks(_results(proc.stdout), loop, proc.stdout)


def test_the_same_script_runs_under_mpitrain_run():
    cmd = [sys.executable, "-m", "mpitrain", "run", "-n", "2", "--all-output", script("library_script.py")[1]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split("] ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("[rank ")]
    assert proc.stdout.count("epoch 3/3") == 1  # rank 0's lines only, though every rank's are shown
    _same_weights_on_both_ranks(_results("\n".join(lines)), False, proc.stdout)


def test_fit_on_a_folder_under_mpiexec_writes_its_run_folder_once(tmp_path_factory, tmp_path):
    # `mpitrain.fit(model, "data/", out=RUN)` on 2 ranks: mpitrain train's pipeline with the
    # script's model. Both ranks end alike, and rank 0 alone writes the run folder.
    import zlib

    import keras
    import numpy as np

    from mpitrain import runfiles
    from mpitrain.data.synth import generate

    data = generate(tmp_path_factory.mktemp("lib") / "data", per_class=32, image_size=16, seed=2)
    run = tmp_path / "run"
    proc, _ = mpirun(2, script("library_folder.py", data, run), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = _results(proc.stdout)
    assert [(r["rank"], r["size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["history"] == ranks[1]["history"]
    assert [row["epoch"] for row in ranks[0]["history"]] == [1, 2, 3]
    assert proc.stdout.count("run folder: ") == 1 and proc.stdout.count("epoch 3/3") == 1
    assert {p.name for p in run.iterdir()} <= set(runfiles.NAMES)  # nothing stray, the lock let go
    doc = json.loads((run / runfiles.CONFIG).read_text())
    assert doc["runtime"]["ranks"] == 2 and doc["config"]["model"].startswith("mpitrain.fit:")
    saved = keras.saving.load_model(run / runfiles.MODEL, compile=False).get_weights()
    assert f"{zlib.crc32(np.concatenate([w.reshape(-1) for w in saved]).tobytes()):08x}" == ranks[0]["checksum"]


def _same_weights_on_both_ranks(ranks, loop, stdout):
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["size"] == 2 for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # broadcast at the start, reduced steps after
    assert ranks[0]["rank_mean"] == ranks[1]["rank_mean"] == 0.5
    assert ranks[0]["history"] == ranks[1]["history"]  # the global numbers on every rank
    if loop:
        assert ranks[0]["history"][-1] < ranks[0]["history"][0]  # it learnt
    else:
        assert ranks[0]["history"][-1]["val_accuracy"] > 0.5
        assert stdout.count("epoch 3/3") == 1  # rank 0 alone prints


def _runnable_examples():
    """The Python blocks of docs/library.md and of the README's "In Python" section."""
    import importlib.util
    from pathlib import Path

    # test_docs.py owns the reading of fenced blocks; load it by path (tests/ is no package).
    spec = importlib.util.spec_from_file_location("docs_blocks", Path(__file__).parents[1] / "unit" / "test_docs.py")
    docs = sys.modules.setdefault("docs_blocks", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(docs)
    ROOT, blocks = docs.ROOT, docs.blocks

    readme = [b for b in blocks(ROOT / "README.md") if b.lang == "python"]
    library = [b for b in blocks(ROOT / "docs" / "library.md") if b.lang == "python"]
    return readme + library


@pytest.mark.parametrize("block", _runnable_examples(), ids=lambda b: b.where())
def test_every_python_example_of_the_library_page_runs(block, tmp_path):
    proc = subprocess.run([sys.executable, "-c", block.text], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, f"{block.where()}:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{block.where()} printed nothing"


def test_the_library_page_has_its_examples():
    assert len(_runnable_examples()) >= 5  # README's, the convnet, callbacks, custom loop, engine


def test_digits_under_two_ranks_match_plain_keras_fit_within_two_points():
    # Issue 19's bar: real data (the UCI digits scikit-learn ships, kept in benchmarks/data),
    # the same model and epochs; two ranks end with identical weights, and validation
    # accuracy is within 2 points of plain model.fit in one process.
    from pathlib import Path

    bench = str(Path(__file__).parents[2] / "benchmarks" / "library.py")
    plain = subprocess.run([sys.executable, bench, "keras"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    keras_acc = json.loads(plain.stdout.strip().splitlines()[-1])["val_accuracy"]
    proc, _ = mpirun(2, [sys.executable, bench, "mpitrain"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["ranks"] == 2 for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert abs(ranks[0]["val_accuracy"] - keras_acc) <= 0.02, (ranks[0]["val_accuracy"], keras_acc)
