"""Whether this host can hold the ranks `-n N` starts here, checked before mpiexec starts.

* more ranks here than `CROWDED` times the cores: one warning line (the job runs, slowly:
  each rank gets a sliver of a core);
* the ranks here times `RANK_MEMORY` (the measured memory of one rank of `mpitrain train`,
  docs/benchmarks.md) more than the host's available memory (runtime.available_memory):
  refused in one line with the figures, unless --force-ranks. Such a job swaps or is
  killed by the kernel: 64 ranks on a 24 GB host never finished their start.

Only what is known is checked: the ranks placed on this host (all without a hostfile,
hosts.ranks_here with one; the other hosts' figures are unknown here), nothing inside a
Slurm allocation (Slurm granted the tasks, on hosts other than this one too). `mpitrain
run` passes no memory figure (a script's memory is unknown, it may not import TensorFlow):
it gets the cores warning only.
"""

from __future__ import annotations

import sys

from mpitrain import slurm
from mpitrain.errors import UserError
from mpitrain.launcher.hosts import ranks_here, read_hostfile
from mpitrain.runtime import available_cores, available_memory

# Bytes one rank of `mpitrain train|evaluate|bench` needs of its own: measured (RssAnon) after
# TensorFlow's import, a registry model's build and its first training steps, 0.40-0.66 GB
# (docs/benchmarks.md says how); the shared libraries (RssFile, ~0.5 GB) are counted once.
RANK_MEMORY = 640 * 2**20
SHARED_MEMORY = 512 * 2**20
CROWDED = 4  # ranks per core past which the job is said to crawl


def check_capacity(n: int, hostfile: str | None, *, per_rank: int | None, force: bool = False) -> None:
    """Warn when the ranks here far exceed the cores; refuse (UserError) when they would not
    fit into the available memory, unless `force`. `per_rank`: bytes per rank, None: no
    memory check."""
    if slurm.allocation() is not None:
        return
    here = ranks_here(n, read_hostfile(hostfile) if hostfile is not None else None)
    if per_rank is not None and not force:
        _check_memory(n, here, per_rank)
    cores = available_cores()
    if here > CROWDED * cores:
        print(
            f"mpitrain: warning: {here} ranks on the {cores} core(s) of this host: each rank gets "
            f"1/{-(-here // cores)} of a core, so the job starts and trains slowly; -n {cores} is usually fastest here",
            file=sys.stderr,
            flush=True,
        )


def _check_memory(n: int, here: int, per_rank: int) -> None:
    free = available_memory()
    need = here * per_rank + SHARED_MEMORY
    if free is not None and need > free:
        fits = max(1, (free - SHARED_MEMORY) // per_rank)
        raise UserError(
            f"-n {n}: {here} rank(s) on this host need about {need / 1e9:.1f} GB ({per_rank / 1e9:.2f} GB each) "
            f"but it has {free / 1e9:.1f} GB available; use -n {fits} or less, or --force-ranks to start them anyway"
        )
