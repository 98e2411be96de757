import json
import subprocess
import sys

import pytest

# What TensorFlow's C++ side prints while it loads unless it is imported the quiet way.
TF_NOTICES = ("absl::InitializeLog", "oneDNN custom operations", "cuda", "TF_ENABLE_ONEDNN_OPTS")


@pytest.mark.timeout(300)
def test_bench_reports_throughput_as_json_on_two_ranks():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpitrain",
            "bench",
            "-n",
            "2",
            "--model",
            "tiny",
            "--image-size",
            "16",
            "--steps",
            "5",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--accumulate",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # --json: standard output is the JSON object and nothing else
    assert result["ranks"] == 2 and result["training_ranks"] == 2
    # 5 steps of 2 micro-batches of 64 on each rank, in the best of 2 timed runs
    assert result["accumulate"] == 2 and result["steps"] == 5 and result["rounds"] == 2
    assert result["images_per_second"] * result["seconds"] == pytest.approx(2 * 5 * 2 * 64, rel=0.05)  # s in ms
    assert 0 < result["images_per_second_mean"] <= result["images_per_second"] * (1 + 1e-6)
    assert "over 2 timed runs" in proc.stderr
    assert result["images_per_second"] > 0
    assert 0.0 < result["comm_fraction"] < 1.0  # two ranks do communicate
    assert result["images_per_second_per_rank"] * 2 == pytest.approx(result["images_per_second"], rel=1e-3)
    assert "img/s total" in proc.stderr  # the human summary moved to stderr
    for notice in TF_NOTICES:
        assert notice not in proc.stderr, proc.stderr
    # How close to the machine: FLOPs counted from the tiny model's layers (16 px: conv
    # 2x9x8 MACs at 16x16 + bias + relu, pool 4x4 windows over 4x4x8, dense 128->16->2),
    # forward x3 for a training image, and the rate they make at the measured speed.
    forward = (2 * 9 * 8 * 256 + 2 * 2048) + 16 * 128 + (2 * 128 * 16 + 2 * 16) + (2 * 16 * 2 + 2 + 6)
    assert result["flops_per_image_forward"] == forward and result["flops_per_image_train"] == 3 * forward
    assert result["uncounted_layers"] == []
    assert result["gflops_per_second"] == pytest.approx(3 * forward * result["images_per_second"] / 1e9, rel=0.01)
    assert result["matmul_gflops_per_second"] > 0
    assert result["fraction_of_matmul"] == pytest.approx(
        result["gflops_per_second"] / result["matmul_gflops_per_second"], rel=0.01
    )
    shares = [result[k] for k in ("compute_fraction", "comm_fraction", "host_fraction")]
    assert all(0.0 <= f <= 1.0 for f in shares) and sum(shares) == pytest.approx(1.0, abs=1e-3)
    assert result["compute_fraction"] > 0
    assert "MFLOP per training image" in proc.stderr and "GFLOP/s achieved" in proc.stderr
    assert "step time: compute" in proc.stderr and "host" in proc.stderr


@pytest.mark.timeout(300)
def test_compare_fit_runs_plain_fit_in_the_precision_asked_for():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpitrain",
            "bench",
            "--model",
            "tiny",
            "--image-size",
            "16",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--precision",
            "bf16",
            "--compare-fit",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["precision"] == "bf16" and result["fit_dtype_policy"] == "mixed_bfloat16"
    assert result["fit_images_per_second"] > 0
    assert result["vs_fit"] == pytest.approx(result["images_per_second"] / result["fit_images_per_second"], rel=0.01)
    assert result["comm_fraction"] == 0.0  # one rank: no MPI
    assert "plain model.fit (mixed_bfloat16)" in proc.stderr


def test_bench_help_says_generated_data_and_why_its_batch_differs(capsys):
    from mpitrain.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "generated random images" in text and "no decoding" in text
    assert "default: 64, not train's 32" in text and "docs/benchmarks.md" in text
