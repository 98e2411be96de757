"""Each rank of `mpitrain run -n N script.py ARGS`: run the user's script as `__main__`.

What `python -m mpi4py script.py` does for its users, with mpitrain's output rules:

* any uncaught exception on any rank prints its traceback and one line naming the rank,
  then aborts the whole job (MPI_Abort), so no other rank is left waiting in a collective;
  `sys.exit(code)` and Ctrl-C (130) end this rank with that code as they would alone, and
  so does a stop request (SIGTERM/SIGUSR1) that `mpitrain.fit` checkpointed (0);
* only rank 0's standard output is shown, unless the launcher was given --all-output
  (MPITRAIN_ALL_OUTPUT=1): then every rank's stdout and stderr lines are tagged
  `[rank R] `; standard error is never hidden (errors must be seen from every rank).

The script sees `sys.argv == [script, *ARGS]` and its own folder first on `sys.path`, as
under `python script.py`. MPI starts only when the script (or mpitrain inside it) asks.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import TextIO

from mpitrain.errors import StopRequested
from mpitrain.parallel.wire import ALL_OUTPUT_ENV, PROGRESS, STATE

WIRE_PREFIX = (PROGRESS, STATE)  # mpitrain's marker lines to the launcher (parallel/wire.py)

_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def env_rank() -> int:
    """This process's rank as its launcher announced it (0 when none did), without starting MPI."""
    for name in _RANK_VARS:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


class Tagged:
    """A text stream that starts each line with a tag (whole lines stay whole)."""

    def __init__(self, stream: TextIO, tag: str):
        self.stream, self.tag, self.fresh = stream, tag, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            # The launcher reads the marker lines: they stay as they are.
            tag = self.tag if self.fresh and not piece.startswith(WIRE_PREFIX) else ""
            out.append(tag + piece)
            self.fresh = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _route_output(rank: int) -> None:
    if os.environ.get(ALL_OUTPUT_ENV) == "1":
        sys.stdout = Tagged(sys.stdout, f"[rank {rank}] ")
        sys.stderr = Tagged(sys.stderr, f"[rank {rank}] ")
    elif rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def run(argv: list[str]) -> int:
    """Run `argv[0]` with arguments `argv[1:]`; returns the exit code."""
    if not argv:
        print("mpitrain: error: no script to run", file=sys.stderr)
        return 2
    script, rank = argv[0], env_rank()
    _route_output(rank)
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else _said(e.code))
    except KeyboardInterrupt:
        return 130
    except StopRequested:  # mpitrain.fit after SIGTERM/SIGUSR1: checkpointed, said by rank 0
        return 0
    except BaseException as e:  # noqa: BLE001 - mpi4py's run.py rule: any uncaught error ends the job
        import traceback

        traceback.print_exc()
        print(f"mpitrain: error on rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        _abort_job()
        return 1
    finally:
        sys.stdout.flush()
    return 0


def _said(message: object) -> int:
    print(message, file=sys.stderr)  # `sys.exit("text")`: Python prints it and exits 1
    return 1


def _abort_job() -> None:
    """End every rank now: the others may be inside a collective waiting for this one."""
    import time

    from mpitrain.parallel.comm import abort_started

    sys.stderr.flush()
    time.sleep(0.5)  # our line reaches the launcher before Open MPI's report of the abort
    abort_started(1)


def _exit(code: int) -> None:
    """Exit with the script's code; after an elastic loss without MPI_Finalize, which may wait forever."""
    from mpitrain.parallel.comm import exit_if_a_rank_was_lost

    exit_if_a_rank_was_lost(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(run(sys.argv[1:]))
