import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(300)
def test_bench_reports_throughput_as_json_on_two_ranks():
    proc = subprocess.run([sys.executable, "-m", "mpitrain", "bench", "-n", "2", "--model", "tiny",
                           "--image-size", "16", "--steps", "5", "--warmup", "1", "--json"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ranks"] == 2 and result["training_ranks"] == 2
    assert result["images_per_second"] > 0
    assert 0.0 < result["comm_fraction"] < 1.0  # two ranks do communicate
    assert result["images_per_second_per_rank"] * 2 == pytest.approx(result["images_per_second"], rel=1e-3)
