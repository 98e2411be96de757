"""`mpitrain train -n N`'s job: supervised, and started again on the hosts left when an
--elastic job lost a host (launcher/hostloss.py plans what is left).

Open MPI's ULFM lets the ranks outlive a dead rank inside one job; a dead host ends the job
(PRRTE's daemons), so the restart happens here, in the process that started mpiexec.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mpitrain.launcher.mpiexec import FIXED_ORDER_FLAGS, elastic_flags
from mpitrain.launcher.reports import lost_host_message
from mpitrain.launcher.supervise import HostLost, supervise
from mpitrain.parallel.wire import OPTIONS_ENV, RESUME_HINT_ENV, options_json


@dataclass(frozen=True)
class Job:
    """One start of mpiexec: where, what for, and the command that continues the run."""

    n: int
    hostfile: str | None
    program: list[str]  # `python -m mpitrain train`
    options: dict  # what the ranks run with (parallel/wire.py's options_json)
    hint: str | None  # the `--resume` command of the run, None without a run folder


def launch_options(args, out, elastic: bool) -> tuple[list[str], str | None, bool]:
    """mpiexec's extra flags, the resume command for `mpitrain train -n N` of `out`, and
    whether the job is elastic.

    A resumed run trains with its saved options, so whether it is elastic (and needs
    Open MPI's ULFM) is read from its newest checkpoint, not from this command line."""
    if args.resume and out is not None:
        from mpitrain.engine.checkpoint import saved_config

        elastic = elastic or bool((saved_config(Path(out)) or {}).get("elastic"))
    fixed = bool(getattr(args, "fixed_order", False))
    hint = None if out is None else _resume(args, args.np, out, args.hostfile, elastic)
    extra = (elastic_flags() if elastic else []) + (FIXED_ORDER_FLAGS if fixed else [])
    return extra, hint, elastic


def _resume(args, n: int, out, hostfile: str | None, elastic: bool) -> str:
    from mpitrain.train.command import resume_command

    fixed = bool(getattr(args, "fixed_order", False))
    return resume_command(n, out, hostfile, elastic, args.iface, fixed_order=fixed)


def run_training(args, job: Job, out, elastic: bool, extra: list[str], fresh=()) -> int:
    """Run the job (again on the hosts left after a host loss, when `elastic`); then tidy up
    after ranks that ended by a signal (Ctrl-C, a lost rank): the lock file rank 0 could not
    remove, and the folders `fresh` (made for this run) if nothing was written into them."""
    from mpitrain.outdir import remove_empty
    from mpitrain.train import runlock

    tag = f"{socket.gethostname()}:{os.getpid()}:{time.time()}"  # rank 0 writes it into the lock

    def report(where):  # after Ctrl-C: where it stopped, what is on disk, how to go on
        from mpitrain.train.command import interrupted_message

        print(interrupted_message(where, out, job.hint), file=sys.stderr)

    try:
        while True:
            try:
                return supervise(
                    job.n,
                    job.program,
                    hostfile=job.hostfile,
                    extra=extra,
                    variables=_variables(job, tag),
                    resume_hint=job.hint,
                    debug=args.debug,
                    on_interrupt=report,
                    stoppable=True,
                    iface=args.iface,
                    heal=elastic and out is not None,
                    contact=True,
                )
            except HostLost as lost:  # --elastic: go on without that host
                healed = heal(args, out, job, lost, tag)
                if healed is None:
                    return 1
                job = healed
    finally:
        if out is not None:
            runlock.clear_job(out, tag)
            remove_empty(list(fresh))


def _variables(job: Job, tag: str) -> dict:
    """The ranks' environment: their options, this launch's tag, the resume command."""
    from mpitrain.train.runlock import JOB_ENV

    env = {OPTIONS_ENV: options_json("train", job.options), JOB_ENV: tag}
    return {**env, RESUME_HINT_ENV: job.hint} if job.hint else env


def heal(args, out, job: Job, loss: HostLost, tag: str) -> Job | None:
    """After losing a host: the job to go on with, said in one line; None after saying in
    one line why the job cannot go on."""
    from mpitrain.launcher import hostloss
    from mpitrain.train import runlock

    try:
        plan = hostloss.plan(Path(out), job.n, job.hostfile, loss.host, placed=loss.placed)
    except hostloss.CannotHeal as why:
        print(lost_host_message(loss.host, job.hint, why=str(why)), file=sys.stderr)
        return None
    print(hostloss.message(loss.host, plan), file=sys.stderr, flush=True)
    hostloss.note(Path(out), loss.host, job.n, plan)
    # Rank 0 was stopped with the job: its lock file stayed behind (it may take a moment to end).
    runlock.clear_job(out, tag, wait=15.0)
    hostfile = str(plan.hostfile)
    hint = _resume(args, plan.ranks, out, hostfile, True)
    # The ranks go on from the newest checkpoint with its saved options, as `--resume` does.
    return replace(job, n=plan.ranks, hostfile=hostfile, options={**job.options, "resume": True}, hint=hint)
