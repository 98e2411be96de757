"""The compiled train step (train/steps.py): what it counts, and an empty local batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# Runs in a child process: with oneDNN an empty batch aborted the whole process
# (SIGABRT in MaxPoolingGrad), which must fail this one test, not end the session.
CHECK = textwrap.dedent("""
    import os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    from mpitrain.runtime import configure_runtime
    from mpitrain.train.models import build_model
    from mpitrain.train.steps import make_train_step

    configure_runtime(0, 1, 1)
    rng = np.random.default_rng(0)
    for name in ("tiny", "seed"):
        model = build_model(name, 12, 2)
        opt = keras.optimizers.SGD(0.1)  # no momentum: a zero gradient leaves the weights
        opt.build(model.trainable_variables)
        seen = []

        def reduce(buf):  # what one rank hands to the allreduce
            seen.append(np.array(buf))
            return np.array(buf)

        step = make_train_step(model, opt, reduce)
        x = rng.random((5, 12, 12, 1)).astype(np.float32)
        y = np.array([0, 1, 1, 0, 1], np.int32)
        stats, probs = step(x, y, np.full(5, 0.5, np.float32), np.float32(0.1))
        hits = int((probs.numpy().argmax(1) == y).sum())
        assert stats.numpy()[0] == 5 and stats.numpy()[2] == hits, (name, stats)

        kernel, bias = model.layers[-1].get_weights()  # every image, the zero one too, is class 0:
        model.layers[-1].set_weights([kernel, np.array([20.0, -20.0], np.float32)])  # a padding row would be a hit
        before = [w.copy() for w in model.get_weights()]
        stats, probs = step(x[:0], y[:0], np.zeros(0, np.float32), np.float32(0.1))
        assert stats.numpy().tolist() == [0.0, 0.0, 0.0], (name, stats)
        assert tuple(probs.shape) == (0, 2), (name, probs.shape)
        assert len(seen) == 2 and not seen[1].any(), name  # it joined the allreduce, with zeros
        after = model.get_weights()
        assert all(np.array_equal(a, b) for a, b in zip(before, after)), name
    print("empty batch ok")
""")


def test_an_empty_local_batch_joins_the_step_with_nothing():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "empty batch ok" in proc.stdout, \
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
