"""`mpitrain.fit` against `mpitrain train` on one model and the same images (issue 19: one
loop, so the same images/s within noise).

Both train the registry's seed CNN at 50 px on the embedded demo data (600 images, 90/10
split), batch 32, one process, fp32: `mpitrain train` from the command line (its epoch rows
in history.csv), and `mpitrain.fit` on the very rows that run decoded (through the same
plan and cache) with a fresh seed model. Images/s: the median epoch after the first.

    python benchmarks/fit_vs_train.py [--epochs 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def train_cli(epochs: int, out: str) -> float:
    cmd = [sys.executable, "-m", "mpitrain", "train", "--epochs", str(epochs), "--precision", "fp32",
           "--threads", "2", "--out", out, "--overwrite"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(os.path.join(out, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    return float(np.median([float(r["images_per_second"]) for r in rows[1:]]))


def library(epochs: int) -> float:
    from mpitrain.config import TrainConfig
    from mpitrain.data.dataset import load_shard, plan_for
    from mpitrain.runtime import configure_runtime

    configure_runtime(0, 2, 1, "fp32")
    import mpitrain
    from mpitrain.train.models import build_model

    cfg = TrainConfig(epochs=epochs, precision="fp32")
    plan = plan_for(cfg)
    data = load_shard(plan, cfg.image_size, cfg.seed, (0, 1), (0, 1), cfg.cache_dir)
    model = build_model(cfg.model, cfg.image_size, len(plan.classes))
    result = mpitrain.fit(
        model, data.train_x, data.train_y, validation_data=(data.val_x, data.val_y), epochs=epochs, batch_size=32,
        lr=1e-3, progress=False,
    )  # fmt: skip
    return float(np.median([r["images_per_second"] for r in result.history[1:]]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--library", action="store_true", help=argparse.SUPPRESS)  # one library run, in a fresh process
    a = p.parse_args()
    if a.library:
        print(library(a.epochs))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            cli = train_cli(a.epochs, os.path.join(tmp, "run"))
            lib = float(subprocess.run([sys.executable, __file__, "--library", "--epochs", str(a.epochs)],
                                       check=True, capture_output=True, text=True).stdout.split()[-1])  # fmt: skip
            rows.append({"round": r + 1, "train_images_per_second": cli, "fit_images_per_second": lib,
                         "fit_over_train": round(lib / cli, 3), "load": round(os.getloadavg()[0], 2)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
