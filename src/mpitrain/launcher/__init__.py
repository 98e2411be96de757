"""The launcher: the parent side of `mpitrain <command> -n N`, never imported by a rank.

    mpiexec.py   the mpiexec command line (which mpiexec, its flags, Slurm, --fixed-order, --elastic)
    hosts.py     the hostfile, where Open MPI places the ranks, this host's networks, --iface
    reports.py   Open MPI's reports of a failed job, each said in one line; its boxes held back
    relay.py     mpiexec's stdout to ours, with the ranks' progress drawn as a bar
    supervise.py the job supervisor: N ranks of any program, deadlines, signals, Ctrl-C, exit code
    commands.py  `train|evaluate|bench -n N`: checks first, then the ranks with the options parsed here
    elastic.py   the training job, started again without a lost host (--elastic)
    hostloss.py  what is left after a lost host: ranks, hostfile, checkpoint

The first five know nothing of mpitrain's commands (tests/unit/test_layers.py): they start
and watch any program. The ranks and the launcher talk through parallel/wire.py alone.
"""
