"""The exceptions that end a command on purpose, and the collective `agree`.

`UserError` means "the user asked for something we cannot do": the CLI turns it into one
line on stderr and exit code 2. `AgreedError` is a UserError every rank knows about, so no
MPI abort is needed; `QuietExit` stops a rank whose reason another rank reports;
`StopRequested` ends a training every rank agreed to stop on a signal (exit code 0). Any other
exception is a bug and keeps its traceback (with --debug) or is summarised (without).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpitrain.parallel.comm import Comm


class UserError(Exception):
    """A mistake in the user's input: bad option, missing folder, unusable data."""


class AgreedError(UserError):
    """A user error every rank knows about: all ranks stop together, no abort is needed."""


class StopRequested(Exception):
    """Every rank agreed to stop (SIGTERM/SIGUSR1) and the run is checkpointed at `epoch`
    (0-based, the one to continue in) and `step` (its steps done): `--resume` goes on."""

    def __init__(self, epoch: int, step: int):
        super().__init__(epoch, step)
        self.epoch, self.step = epoch, step


class QuietExit(Exception):
    """Stop this rank with a code; another rank reports the reason (`message`, when this
    rank knows it too: a library caller gets it on every rank, see mpitrain/api.py)."""

    def __init__(self, code: int, message: str | None = None):
        super().__init__(code)
        self.code, self.message = code, message


def agree(comm: Comm, error: str | None) -> None:
    """Collective: if any rank hit an error, every rank stops; rank 0 says why, once."""
    errors = comm.allgather_obj(error)
    first = next(((r, e) for r, e in enumerate(errors) if e), None)
    if first is None:
        return
    rank, msg = first
    said = msg if rank == 0 or comm.size == 1 else f"(rank {rank}) {msg}"
    if comm.rank == 0:
        raise AgreedError(said)
    raise QuietExit(2, said)
