"""Import TensorFlow without its start-up banner.

TensorFlow's C++ side prints absl and oneDNN notices straight to file descriptor 2 while it
loads, whatever TF_CPP_MIN_LOG_LEVEL says. Under mpiexec that is two lines per rank before
anything useful. We point fd 2 at /dev/null for the import only; a failing import still
raises its Python exception. MPITRAIN_TF_VERBOSE=1 shows everything.
"""

from __future__ import annotations

import os
import sys


def import_tensorflow():
    if "tensorflow" in sys.modules or os.environ.get("MPITRAIN_TF_VERBOSE") == "1":
        import tensorflow

        return tensorflow
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow
        import keras  # noqa: F401  (loads the TF backend while fd 2 is quiet)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tensorflow
