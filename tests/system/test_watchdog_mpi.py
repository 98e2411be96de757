import pytest
from mpirun import mpirun, script


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_a_stuck_rank_is_turned_into_an_error(tmp_path, synth_data):
    proc, seconds = mpirun(3, script("fault_at_step.py", "train", "--data", synth_data, "--model", "tiny",
                                     "--image-size", 16, "--epochs", 2, "--batch-size", 4, "--timeout", 5,
                                     "--out", tmp_path / "run"), timeout=120,
                           env={"FAULT": "stall", "FAULT_RANK": "1", "FAULT_AT": "3"})
    assert proc.returncode != 0
    assert "no progress for" in proc.stderr and "--timeout 5" in proc.stderr, proc.stderr[-2000:]
    assert seconds < 60
