"""Under a real mpiexec: the strategies' start-up broadcast, and equal step counts on
shards that straddle a batch boundary."""

import glob
import os
from pathlib import Path

import numpy as np
import pytest

from mpirun import mpirun, script

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(400)]


def _assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


STRATEGIES = ["allreduce", "local-sgd", "master-worker"]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """One 2-rank job that starts each strategy in turn, from fresh per-rank weights each time."""
    out = tmp_path_factory.mktemp("start")
    proc, _ = mpirun(2, script("start_bcast.py", "--out", out, "--strategy", *STRATEGIES), timeout=180)
    _assert_ok(proc)
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_start_gives_every_rank_rank_0s_weights_and_optimizer_state(started, strategy):
    ranks = [dict(np.load(started / strategy / f"rank{r}.npz")) for r in range(2)]
    r0, r1 = ranks
    # the ranks really started apart, in weights and in optimizer state
    assert r0["w_pre"].size and r0["s_pre"].size
    assert not np.array_equal(r0["w_pre"], r1["w_pre"])
    assert not np.array_equal(r0["s_pre"], r1["s_pre"])
    for r, got in enumerate(ranks):
        assert np.array_equal(got["w_post"], r0["w_pre"]), f"rank {r}: weights are not rank 0's"
        assert np.array_equal(got["s_post"], r0["s_pre"]), f"rank {r}: optimizer state is not rank 0's"


@pytest.mark.parametrize("strategy,sync_every", [("allreduce", None), ("local-sgd", 2)])
def test_shards_straddling_a_batch_boundary_take_the_same_steps(tmp_path, strategy, sync_every):
    # 33 samples on 2 ranks: shards of 17 and 16; with batch 8 that is 3 batches against 2.
    # The longest shard decides: both ranks take 3 steps per epoch (rank 1's last one empty).
    extra = ["--sync-every", sync_every] if sync_every else []
    proc, _ = mpirun(
        2,
        script(
            "fit_weights.py",
            "--out",
            tmp_path,
            "--strategy",
            strategy,
            "--samples",
            33,
            "--batch",
            8,
            "--epochs",
            2,
            *extra,
        ),
        timeout=150,
    )
    _assert_ok(proc)
    steps = {}
    for f in sorted(glob.glob(os.path.join(tmp_path, "rank*.steps"))):
        taken, samples = map(int, Path(f).read_text().split())
        steps[os.path.basename(f)] = (taken, samples)
    assert sorted(s for _, s in steps.values()) == [16, 17]  # the shards do straddle
    assert {t for t, _ in steps.values()} == {2 * 3}, steps
    w0, w1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(2))
    assert len(w0.files) == len(w1.files) > 0
    for k in w0.files:
        assert np.array_equal(w0[k], w1[k]), k


def test_an_empty_last_batch_leaves_allreduce_equal_to_one_process(tmp_path):
    # Rank 1's third batch is empty; the global batch is then rank 0's alone, and the step
    # must still be the gradient of its mean loss, as in one process with the same batches.
    import subprocess

    common = ["--samples", 33, "--batch", 8, "--epochs", 2]
    proc, _ = mpirun(
        2, script("fit_weights.py", "--out", tmp_path / "mpi", "--strategy", "allreduce", *common), timeout=150
    )
    _assert_ok(proc)
    ref = subprocess.run(
        script("fit_weights.py", "--out", tmp_path / "ref", "--reference", 2, *common),
        capture_output=True,
        text=True,
        timeout=240,
    )
    _assert_ok(ref)
    got, want = np.load(tmp_path / "mpi" / "rank0.npz"), np.load(tmp_path / "ref" / "rank0.npz")
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want.files) < 1e-5
