"""Times mpitrain's own allreduce of a fused gradient buffer (run under mpiexec by scaling.py).

    python benchmarks/allreduce_probe.py SIZE_BYTES[,SIZE_BYTES...] [--repeats R]

For each buffer size (float32 bytes) and each of `none` (one float32 MPI_Allreduce, as
`--compress none` sends) and `bf16` (the bfloat16 buffer with mpitrain's user-defined sum, as
`--compress bf16` sends; the 16-byte statistics and stop vote are left out, their latency is modelled),
every rank times R calls after 2 untimed ones; a barrier starts each call, and the slowest
rank's time counts. Rank 0 prints one JSON line per (size, compression) with all R times.
"""

import json
import sys
import time

import numpy as np

from mpitrain.parallel.comm import world
from mpitrain.parallel.strategies.allreduce import bf16_add, to_bf16


def main() -> None:
    sizes = [int(s) for s in sys.argv[1].split(",")]
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 7
    comm = world()
    rng = np.random.default_rng(comm.rank)
    for size in sizes:
        grads = rng.standard_normal(size // 4).astype(np.float32)
        for compress in ("none", "bf16"):
            times = []
            for r in range(repeats + 2):
                buf = grads.copy()
                comm.barrier()  # collective: all ranks start together
                t = time.perf_counter()
                if compress == "none":
                    comm.allreduce_sum_(buf)
                else:
                    # as the strategy does: round, reduce in bfloat16 (the expansion back is
                    # a few ms per 10 M values and is timed by the same code in training)
                    comm.allreduce_op_(to_bf16(buf), bf16_add)
                dt = comm.allreduce_max(time.perf_counter() - t)  # the slowest rank
                if r >= 2:
                    times.append(dt)
            if comm.rank == 0:
                print(
                    json.dumps({"ranks": comm.size, "bytes": size, "compress": compress, "seconds": times}), flush=True
                )


if __name__ == "__main__":
    main()
