"""An `--elastic` job that lost a whole host goes on without it, from its newest checkpoint.

Open MPI's ULFM lets the ranks outlive a dead *rank* (parallel/comm.py, train/trainer.py's
`_recover`), but not a dead *host*: when the Open MPI daemon of a host stops answering,
PRRTE ends the whole job, `--with-ft ulfm` or not (its error manager treats a lost daemon
as the end of the virtual machine). So the healing of a lost host happens one level up, in
`mpitrain train -n N --hostfile F --elastic`, the process that started mpiexec:

1. mpiexec ends; its report names the host whose daemon was lost (`reports.lost_host`);
2. `plan` works out what is left: the hostfile without that host (written into the run
   folder as `hostfile`, so the printed `--resume` command still works later), the ranks
   that ran there (as the ranks reported their hosts at start, `wire.first_contact`;
   else by slot, `hosts.placement`), the strategy's minimum, and the
   newest checkpoint to continue from;
3. the launcher says so in one line, notes the event in `events.jsonl` and starts mpiexec
   again (launcher/elastic.py) with `train --resume` on the remaining hosts. The ranks read the saved options;
   with fewer ranks than the checkpoint was written by, an elastic run's ranks all start
   from rank 0's state, as the survivors of a lost rank do (parallel/rankstate.py), and a
   mid-epoch position is carried over in proportion (train/trainer.py).

The work since the newest checkpoint is done again (checkpoints come at every epoch's end,
and every S steps with `--checkpoint-every S`). What cannot heal, and fails in one line
with the `--resume` command as before: the launcher's own host (it is gone with it), a
loss before the first checkpoint, too few ranks left for the strategy, a job without a
hostfile (one host, or hosts chosen by Slurm), or a host name the hostfile does not have.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from mpitrain import runfiles


@dataclass(frozen=True, kw_only=True)
class Plan:
    ranks: int  # ranks to go on with
    hostfile: Path  # the remaining hosts (in the run folder)
    lost_ranks: int  # ranks that ran on the lost host
    position: str  # where the run continues, e.g. "end of epoch 1"


class CannotHeal(Exception):
    """Why the job cannot go on without the lost host (said after "host X was lost and ...")."""


def _matching(name: str, hosts) -> list[str]:
    """The names in `hosts` that are `name`: by name (or short name) first; only if none is,
    by address (a hostfile may name a host by its address, Open MPI by its hostname)."""
    same = [h for h in hosts if h == name or h.split(".")[0] == name.split(".")[0]]
    if same:
        return same
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return []
    found = []
    for h in hosts:
        try:
            if h == address or socket.gethostbyname(h) == address:
                found.append(h)
        except OSError:
            pass
    return found


def plan(
    out: Path,
    n: int,
    hostfile: str | None,
    lost: str,
    here: set[str] | None = None,
    cores: int | None = None,
    placed: list[str] | None = None,
) -> Plan:
    """How the run in `out` goes on after `lost` (a host of `hostfile`) was lost; raises
    CannotHeal with the reason when it cannot. The strategy (and its fewest ranks) is the
    newest checkpoint's. `placed`: the host of every rank, as the
    ranks reported it (else the ranks on `lost` are worked out from the hostfile's slots,
    as Open MPI fills them; a host without `slots=` then counts as 1)."""
    from mpitrain.engine.checkpoint import describe_position, latest_meta
    from mpitrain.launcher.hosts import local_names, placement, read_hostfile
    from mpitrain.parallel.strategies import strategy_class

    if hostfile is None:
        raise CannotHeal("only a job started with --hostfile can go on without one of its hosts")
    here = local_names() if here is None else here
    if _matching(lost, here):
        raise CannotHeal("it is the launcher's own host")
    hosts = read_hostfile(hostfile)
    gone = _matching(lost, [h for h, _ in hosts])
    if not gone:
        raise CannotHeal(f"the hostfile {hostfile} does not name it")
    there = 0
    if placed and len(placed) == n:
        on_lost = {h for h in set(placed) if _matching(h, gone)}
        there = sum(1 for h in placed if h in on_lost)
    lost_ranks = there or sum(k for (h, _), k in zip(hosts, placement(n, hosts, here, cores)) if h in gone)
    left = [(h, s) for h, s in hosts if h not in gone]
    ranks = n - lost_ranks
    found = latest_meta(Path(out))
    if found is None:
        raise CannotHeal("the run had no checkpoint yet")
    meta = found[1]
    if meta.get("status") == "finished":
        raise CannotHeal("the run had finished")
    problem = strategy_class(meta["strategy"]).too_few_ranks(ranks) if ranks > 0 else "no host is left"
    if problem:
        raise CannotHeal(f"only {max(ranks, 0)} rank(s) are left and {problem}")
    path = Path(out) / runfiles.HOSTFILE  # the hosts the elastic run goes on with
    path.write_text(
        "# written by mpitrain after losing host "
        + lost
        + "\n"
        + "".join(f"{h}{f' slots={s}' if s is not None else ''}\n" for h, s in left)
    )
    return Plan(
        ranks=ranks, hostfile=path, lost_ranks=lost_ranks, position=describe_position(meta["epoch"], meta["step"])
    )


def message(lost: str, p: Plan) -> str:
    return (
        f"mpitrain: host {lost} was lost with {p.lost_ranks} rank(s) (--elastic): going on with "
        f"{p.ranks} rank(s) on the hosts left ({p.hostfile}) from the newest checkpoint ({p.position})"
    )


def note(out: Path, lost: str, before: int, p: Plan) -> None:
    """One line in the run's `events.jsonl` (as a lost rank's), written by the launcher."""
    from mpitrain.train import runfolder

    runfolder.append_event(
        out,
        runfolder.event(
            "host_lost",
            host=lost,
            lost_ranks=p.lost_ranks,
            ranks_before=before,
            ranks_after=p.ranks,
            continue_from=p.position,
            hostfile=str(p.hostfile),
        ),
    )
