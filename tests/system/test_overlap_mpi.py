"""Under a real mpiexec, 3 ranks: --overlap sums the same gradients as the fused buffer, bit
for bit, in float32 and with --compress bf16 (a short and an empty last batch included);
auto leaves a one-bucket model on the fused sum; --accumulate 2 at batch 8 trains as batch
16 (`mpi_programs/overlap_same.py`)."""

import json

import pytest

from mpirun import mpirun, script

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def results():
    proc, _ = mpirun(3, script("overlap_same.py"), timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stdout": proc.stdout}


@pytest.mark.parametrize("compress", ["none", "bf16"])
def test_overlap_gives_the_weights_of_the_fused_sum_bit_for_bit(results, compress):
    assert results["ranks"] == 3
    assert results[f"on-{compress}"] == results[f"off-{compress}"]
    assert results["on-bf16"] != results["on-none"]  # compression is applied bucket by bucket too
    assert results["threads-after-on"] == 2  # the two runs with --overlap on summed in buckets
    # rank 0 says so, once per run (0.2 MB buckets of the model's 0.9 MB)
    said = [line for line in results["stdout"].splitlines() if line.startswith("overlap: the gradient sum in ")]
    assert len(said) == 2 and "buckets of about 0.2 MB" in said[0]


def test_auto_keeps_a_one_bucket_model_on_the_fused_sum(results):
    assert results["auto-one-bucket"] == results["off-none"]
    assert results["threads-after-auto"] == results["threads-after-on"]  # no exchange thread made


def test_accumulating_two_micro_batches_trains_as_the_doubled_batch(results):
    assert results["moved"] > 1e-3  # training changed the weights
    assert results["accumulate-max-diff"] < 1e-6
