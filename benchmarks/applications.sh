#!/usr/bin/env bash
# A keras.applications model through `mpitrain bench` (issue 19): MobileNetV3Small at 96 px,
# colour, 1 and 2 ranks, fp32 and bf16, ROUNDS rounds alternating; one JSON line per run,
# each after a line with the load average (speed figures want a quiet machine).
# Usage: PYTHON=.venv/bin/python ROUNDS=2 benchmarks/applications.sh > apps.log
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
MODEL="${MODEL:-mobilenet_v3_small}"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for precision in fp32 bf16; do
    for n in 1 2; do
      echo "== round $round -n $n $precision load $(cut -d' ' -f1-3 /proc/loadavg)"
      "$PYTHON" -m mpitrain bench -n "$n" --model "$MODEL" --image-size 96 --channels 3 --batch-size 32 \
        --steps 20 --warmup 3 --repeats 2 --precision "$precision" --json 2>/dev/null
    done
  done
done
