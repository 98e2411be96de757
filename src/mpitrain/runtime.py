"""Process set-up shared by every command: cores, threads per rank, seeds, a quiet TensorFlow.

One home for these rules, so that `train`, `evaluate`, `predict` and `bench` set up a process
the same way without importing each other.
"""

from __future__ import annotations

import os
import sys


def available_cores() -> int:
    """CPUs this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def import_tensorflow():
    """Import TensorFlow without its start-up banner.

    TensorFlow's C++ side prints absl and oneDNN notices straight to file descriptor 2 while
    it loads, whatever TF_CPP_MIN_LOG_LEVEL says. Under mpiexec that is two lines per rank
    before anything useful. We point fd 2 at /dev/null for the import only; a failing import
    still raises its Python exception. MPITRAIN_TF_VERBOSE=1 shows everything.
    """
    if "tensorflow" in sys.modules or os.environ.get("MPITRAIN_TF_VERBOSE") == "1":
        import tensorflow

        return tensorflow
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras  # noqa: F401  (loads the TF backend while fd 2 is quiet)
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tensorflow


def configure_runtime(seed: int, threads: int | None, local_ranks: int) -> int:
    """Threads per rank (the node's cores split between its ranks) and seeded determinism.

    Must run before TensorFlow executes its first op. Returns the threads per rank.
    """
    tf = import_tensorflow()
    import keras

    n = threads or max(1, available_cores() // max(1, local_ranks))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)
    except RuntimeError:  # already initialised (second run in one process, e.g. tests)
        pass
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    return n
