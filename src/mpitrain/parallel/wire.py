"""What the ranks and the launcher (`mpitrain <command> -n N`, launcher/) tell each other.

Both sides import this module and nothing else of each other: the ranks never import
launcher/ (tests/unit/test_layers.py).

From the launcher to the ranks, in their environment (forwarded to other hosts with -x):

* MPITRAIN_LAUNCHER=1: our launcher relays the output, so rank 0 writes progress and
  state as marker lines (below) instead of drawing a bar;
* MPITRAIN_OPTIONS: the command's options as the launcher parsed and checked them (JSON,
  `options_json`), so that no rank parses a command line again (`received_options`);
* MPITRAIN_RESUME_HINT: the `--resume` command for rank 0 to print after a stop.

From rank 0 to the launcher, on stdout: one complete line per message (Open MPI forwards a
rank's output by lines). Each is an OSC escape sequence, so a terminal that sees one by
mistake shows nothing of it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotation only: nothing of mpitrain is imported at run time
    from mpitrain.parallel.comm import Comm

LAUNCHER_ENV = "MPITRAIN_LAUNCHER"
OPTIONS_ENV = "MPITRAIN_OPTIONS"
RESUME_HINT_ENV = "MPITRAIN_RESUME_HINT"
# The launcher's deadline for the job's start ("contact" below), set by the user.
START_TIMEOUT_ENV = "MPITRAIN_START_TIMEOUT"
START_TIMEOUT = 45.0  # seconds; with start-up and the stop the job has ended within a minute

PROGRESS = "\x1b]mpitrain-progress;"
STATE = "\x1b]mpitrain-state;"
HOSTS_STATE = "hosts="  # then the host of every rank, in rank order, comma-separated
_BEL = "\x07"
# `mpitrain run`: every rank's output, tagged by rank (else rank 0's stdout alone), and the
# --timeout its scripts' `mpitrain.fit` takes as the default of its `timeout` option.
ALL_OUTPUT_ENV = "MPITRAIN_ALL_OUTPUT"
TIMEOUT_ENV = "MPITRAIN_TIMEOUT"


def under_launcher() -> bool:
    return os.environ.get(LAUNCHER_ENV) == "1"


def progress_line(where: str, text: str) -> str:
    """A marker line: `where` ("epoch 1/5, step 12/45") and the bar `text` ("" = erase it)."""
    return f"{PROGRESS}{where.replace(';', ',')};{text.replace(chr(10), ' ')}{_BEL}\n"


def parse_progress(line: str) -> tuple[str, str] | None:
    if not line.startswith(PROGRESS):
        return None
    body = line[len(PROGRESS) :].rstrip("\r\n")
    if body.endswith(_BEL):
        body = body[:-1]
    where, _, text = body.partition(";")
    return where, text


def state_line(state: str) -> str:
    """The job's start, never shown: "started" right after MPI_Init (Open MPI starts ranks
    only once the daemons of every host have connected back to mpiexec), the hosts of the
    ranks and "contact" after the ranks' first message to each other."""
    return f"{STATE}{state}{_BEL}\n"


def parse_state(line: str) -> str | None:
    if not line.startswith(STATE):
        return None
    return line[len(STATE) :].rstrip("\r\n").rstrip(_BEL)


def first_contact(comm: Comm) -> None:
    """Under our launcher, rank 0 reports that the job started and, once the ranks have
    reached each other, the host of every rank and "contact" (the launcher stops a job that
    does not make contact within its deadline; the hosts tell it how many ranks a lost host
    held). Called once, as soon as MPI is up (comm.world), by every rank."""
    if not under_launcher() or comm.size == 1:
        return
    import socket

    if comm.rank == 0:
        sys.stdout.write(state_line("started"))
        sys.stdout.flush()
    # Collective: the ranks' first message to each other. Over a network that does not
    # connect their hosts it never completes (packets dropped without an answer): the
    # launcher's deadline turns that into one line instead of a hang.
    hosts = comm.allgather_obj(socket.gethostname())
    if comm.rank == 0:
        sys.stdout.write(state_line(HOSTS_STATE + ",".join(hosts)) + state_line("contact"))
        sys.stdout.flush()


def options_json(command: str, options: dict) -> str:
    """MPITRAIN_OPTIONS' value: the `command` the ranks run and its parsed `options`
    (argparse's names; JSON values only)."""
    return json.dumps({"command": command, "options": options}, sort_keys=True)


def received_options(argv: list[str]) -> dict | None:
    """The options the launcher sent, when this process is one of its ranks: it runs
    `python -m mpitrain COMMAND` (argv == [COMMAND]) with MPITRAIN_OPTIONS for that command.
    None otherwise (a command line of the user's: parse it)."""
    text = os.environ.get(OPTIONS_ENV)
    if not text:
        return None
    doc = json.loads(text)
    return doc["options"] if argv == [doc["command"]] else None
