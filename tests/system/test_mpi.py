"""Distributed training under a real mpiexec: equivalences, weighted means, failures."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mpirun import cli, mpirun, script

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(400)]


def _weights(folder):
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "rank*.npz"))):
        with np.load(f) as z:
            out[os.path.basename(f)] = [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]
    return out


def _assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


# 3 ranks (an odd count); 2 ranks against one process are compared, with an uneven last
# batch, by test_mpi_sync.py::test_an_empty_last_batch_leaves_allreduce_equal_to_one_process.
@pytest.mark.parametrize("n", [3])
def test_allreduce_equals_one_process_with_n_times_the_batch(tmp_path, n):
    proc, _ = mpirun(n, script("fit_weights.py", "--out", tmp_path / "mpi", "--strategy", "allreduce"))
    _assert_ok(proc)
    ref = subprocess.run(
        script("fit_weights.py", "--out", tmp_path / "ref", "--reference", n),
        capture_output=True,
        text=True,
        timeout=240,
    )
    _assert_ok(ref)
    ranks = _weights(tmp_path / "mpi")
    assert len(ranks) == n
    first = ranks["rank0.npz"]
    for name, w in ranks.items():  # identical on every rank, to the bit
        assert all(np.array_equal(x, y) for x, y in zip(first, w)), name
    reference = _weights(tmp_path / "ref")["rank0.npz"]
    start = _weights_of_untrained()
    assert _max_diff(first, start) > 1e-3  # it did train
    assert _max_diff(first, reference) < 1e-5


def _weights_of_untrained():
    code = (
        "import os; os.environ['TF_CPP_MIN_LOG_LEVEL']='2'\n"
        "from mpitrain.runtime import configure_runtime; configure_runtime(3, 1, 1)\n"
        "from mpitrain.train.models import build_model; import numpy as np, sys\n"
        "np.savez(sys.argv[1], *build_model('tiny', 12, 2).get_weights())\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.npz")
        subprocess.run([sys.executable, "-c", code, path], check=True, timeout=120)
        with np.load(path) as z:
            return [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]


def test_local_sgd_every_step_with_plain_sgd_equals_allreduce(tmp_path):
    # 64 samples over 2 ranks, batch 8: every step has equal local batches, where averaging
    # weights after each plain-SGD step is the same as averaging the gradients.
    common = ["--samples", 64, "--batch", 8]
    a, _ = mpirun(2, script("fit_weights.py", "--out", tmp_path / "ar", "--strategy", "allreduce", *common))
    b, _ = mpirun(
        2, script("fit_weights.py", "--out", tmp_path / "ls", "--strategy", "local-sgd", "--sync-every", 1, *common)
    )
    _assert_ok(a)
    _assert_ok(b)
    wa, wb = _weights(tmp_path / "ar"), _weights(tmp_path / "ls")
    assert _max_diff(wa["rank0.npz"], wb["rank0.npz"]) < 1e-5
    assert _max_diff(wb["rank0.npz"], wb["rank1.npz"]) == 0.0


def test_master_combines_the_sample_weighted_mean_of_the_workers():
    # 2 workers with 13 and 23 samples: their weighted mean is not their plain mean.
    proc, _ = mpirun(3, script("mw_mean.py"))
    _assert_ok(proc)
    assert proc.stdout.count("max error") == 3


def test_master_worker_trains_and_all_ranks_agree(tmp_path):
    proc, _ = mpirun(
        3, script("fit_weights.py", "--out", tmp_path / "mw", "--strategy", "master-worker", "--sync-every", 2)
    )
    _assert_ok(proc)
    ranks = _weights(tmp_path / "mw")
    assert len(ranks) == 3
    assert _max_diff(ranks["rank0.npz"], ranks["rank1.npz"]) == 0.0
    assert _max_diff(ranks["rank0.npz"], ranks["rank2.npz"]) == 0.0


def test_an_exception_on_one_rank_ends_the_job(tmp_path, synth_data):
    proc, seconds = mpirun(
        3,
        script(
            "fault_at_step.py",
            "train",
            "--data",
            synth_data,
            "--model",
            "tiny",
            "--image-size",
            16,
            "--epochs",
            2,
            "--batch-size",
            4,
            "--out",
            tmp_path / "run",
        ),
        timeout=120,
        env={"FAULT": "raise", "FAULT_RANK": "1", "FAULT_AT": "3"},
    )
    assert proc.returncode != 0
    assert proc.stderr.count("injected failure for the test") == 1, proc.stderr
    assert "rank 1" in proc.stderr
    assert seconds < 60  # start-up of 3 TensorFlow processes included; the hang guard is the timeout


def test_cli_launcher_runs_master_worker_with_three_processes(tmp_path, synth_data):
    out = tmp_path / "run"
    proc = subprocess.run(
        cli(
            "train",
            "-n",
            3,
            "--strategy",
            "master-worker",
            "--data",
            synth_data,
            "--model",
            "tiny",
            "--image-size",
            16,
            "--epochs",
            2,
            "--batch-size",
            8,
            "--out",
            out,
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    _assert_ok(proc)
    assert "master-worker" in proc.stdout and "rank 0 = master" in proc.stdout
    assert proc.stdout.count("epoch 2/2") == 1  # rank 0 alone prints
    for name in ("model.keras", "config.json", "history.csv", "metrics.json", "classes.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["runtime"]["ranks"] == 3
    assert (
        "| rank 0 (master) waiting in collectives, mostly for the workers' training |"
        in (out / "report.md").read_text()
    )


def test_direct_mpiexec_with_data_on_root_matches_the_run_folder_contract(tmp_path, synth_data):
    out = tmp_path / "run"
    proc, _ = mpirun(
        2,
        cli(
            "train",
            "--data",
            synth_data,
            "--data-on-root",
            "--model",
            "tiny",
            "--image-size",
            16,
            "--epochs",
            1,
            "--batch-size",
            8,
            "--out",
            out,
        ),
    )
    _assert_ok(proc)
    assert "loaded 72 train + 8 val images" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_samples"] == 8 and metrics["train_samples"] == 72


def test_a_setup_error_under_mpiexec_is_reported_once_and_no_rank_hangs(tmp_path):
    proc, seconds = mpirun(3, cli("train", "--data", tmp_path / "missing", "--out", tmp_path / "r"), timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("does not exist") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_ranks_started_with_different_options_are_refused_by_name(tmp_path, synth_data):
    from mpitrain.launcher.mpiexec import mpiexec_command

    base = cli(
        "train", "--data", synth_data, "--model", "tiny", "--image-size", 16, "--epochs", 1, "--out", tmp_path / "run"
    )
    cmd, env = mpiexec_command(3, base + ["--seed", "1"])  # 3 ranks in all: --oversubscribe
    cmd[cmd.index("-n") + 1] = "2"
    at = cmd.index(sys.executable)
    # MPMD: rank 0 and 1 get --seed 1, rank 2 gets --seed 2
    cmd = cmd[:at] + base + ["--seed", "1"] + [":", "-n", "1"] + base + ["--seed", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("rank(s) [2] were started with a different config") == 1, proc.stderr[-2000:]


def test_master_worker_epoch_rows_report_the_workers_time(tmp_path, synth_data):
    # Worker 1 takes >= 0.3 s for each of its 9 steps per epoch; the master spends 5 s
    # writing each checkpoint, during which the workers already train the next epoch. The
    # epoch rows must report the workers' wall time and images, not the idle master's.
    out = tmp_path / "run"
    proc, _ = mpirun(
        3,
        script(
            "fault_at_step.py",
            "train",
            "--data",
            synth_data,
            "--model",
            "tiny",
            "--image-size",
            16,
            "--batch-size",
            4,
            "--epochs",
            2,
            "--strategy",
            "master-worker",
            "--out",
            out,
        ),
        timeout=300,
        env={"FAULT": "slow", "FAULT_RANK": "1", "FAULT_AT": "1", "FAULT_SECONDS": "0.3", "SAVE_DELAY": "5"},
    )
    _assert_ok(proc)
    import csv

    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        seconds, rate = float(row["seconds"]), float(row["images_per_second"])
        assert seconds >= 9 * 0.3, row
        assert rate * seconds == pytest.approx(72, rel=0.02), row  # all 72 training images
