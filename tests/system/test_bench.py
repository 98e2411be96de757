import json
import subprocess
import sys

import pytest

# What TensorFlow's C++ side prints while it loads unless it is imported the quiet way.
TF_NOTICES = ("absl::InitializeLog", "oneDNN custom operations", "cuda", "TF_ENABLE_ONEDNN_OPTS")


@pytest.mark.timeout(300)
def test_bench_reports_throughput_as_json_on_two_ranks():
    proc = subprocess.run([sys.executable, "-m", "mpitrain", "bench", "-n", "2", "--model", "tiny",
                           "--image-size", "16", "--steps", "5", "--warmup", "1", "--json"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # --json: standard output is the JSON object and nothing else
    assert result["ranks"] == 2 and result["training_ranks"] == 2
    assert result["images_per_second"] > 0
    assert 0.0 < result["comm_fraction"] < 1.0  # two ranks do communicate
    assert result["images_per_second_per_rank"] * 2 == pytest.approx(result["images_per_second"], rel=1e-3)
    assert "img/s total" in proc.stderr  # the human summary moved to stderr
    for notice in TF_NOTICES:
        assert notice not in proc.stderr, proc.stderr


def test_bench_help_says_generated_data_and_why_its_batch_differs(capsys):
    from mpitrain.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "generated random images" in text and "no decoding" in text
    assert "default: 64, not train's 32" in text and "docs/benchmarks.md" in text
