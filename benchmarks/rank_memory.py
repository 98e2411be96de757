"""The memory of one rank, as `-n N`'s host check counts it (launcher/capacity.py): the
process's own memory (RssAnon) and the shared libraries (RssFile) after each stage.

    python benchmarks/rank_memory.py xray 64
"""

import sys

import numpy as np


def status() -> str:
    with open("/proc/self/status") as f:
        wanted = [line.split() for line in f if line.startswith(("RssAnon", "RssFile"))]
    return "  ".join(f"{k} {int(v) / 1024:.0f} MB" for k, v, _ in wanted)


def main(name: str, size: int) -> None:
    from mpi4py import MPI  # noqa: F401  (as a rank has it)

    print("python + mpi4py:", status())
    from mpitrain.runtime import import_tensorflow

    import_tensorflow()
    print("TensorFlow imported:", status())
    from mpitrain.train.models import build_model

    model = build_model(name, size, 2, 1)
    print(f"{name} {size} px built:", status())
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(np.zeros((32, size, size, 1), "float32"), np.zeros((32,), "int32"), epochs=1, verbose=0)
    print("one training step, batch 32:", status())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "xray", int(sys.argv[2]) if len(sys.argv) > 2 else 64)
