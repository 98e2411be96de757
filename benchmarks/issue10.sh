#!/usr/bin/env bash
# Every figure of docs/benchmarks.md's issue 10 sections ("The lean step", "How close to the
# machine", "Peers"), in one command, from the repository root:
#
#     benchmarks/issue10.sh [BEFORE_COMMIT] > issue10.log 2>&1
#
# BEFORE_COMMIT (default d7e0665: main before the lean step, with the loop split out so it
# can be timed alone) is unpacked with `git archive` into a temporary folder; its
# step_profile runs alternate with this checkout's, so slow phases of the machine hit both.
# Uses .venv/bin/python (override: PYTHON=...). Takes about 25 min on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BEFORE=${1:-d7e0665}
ROUNDS=${ROUNDS:-3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive "$BEFORE" src | tar -x -C "$tmp"
load() { echo "  [$(date +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)]"; }

echo "== the lean step: trainer loop against the compiled step alone (before = $BEFORE, after = $(git rev-parse --short HEAD))"
for r in $(seq "$ROUNDS"); do
  for args in "--precision fp32 --threads 1" "--precision bf16 --threads 2"; do
    for side in before after; do
      src=$PWD/src; [ "$side" = before ] && src=$tmp/src
      echo "-- round $r, $side, $args"; load
      PYTHONPATH=$src $PY benchmarks/step_profile.py --steps 100 --repeats 3 $args | tail -7
    done
  done
done

echo "== mpitrain bench at train's batch (32/rank): FLOPs, GFLOP/s, shares; fit in the same precision"
for r in $(seq "$ROUNDS"); do
  for p in fp32 bf16; do
    echo "-- round $r, $p"; load
    PYTHONPATH=$PWD/src $PY -m mpitrain bench --batch-size 32 --steps 100 --repeats 3 --precision $p --compare-fit
    PYTHONPATH=$PWD/src $PY -m mpitrain bench -n 2 --batch-size 32 --steps 100 --repeats 3 --precision $p
  done
done

echo "== peers: mpitrain -n 2, Keras fit, MultiWorkerMirroredStrategy x2 (tf_keras)"; load
$PY benchmarks/peers.py -n 2 --batch-size 32 --steps 100 --rounds "$ROUNDS"
load
