#!/usr/bin/env python3
"""Stands in for mpiexec (MPITRAIN_MPIEXEC) to see what the launcher sends it: says
"started" (after rank 0's progress marker of a first step: a SIGTERM before it would end
the job as Ctrl-C does, there being nothing to save yet), then reports the first signal it gets and exits (0 for SIGUSR1, the request
Open MPI forwards to the ranks; 143 for SIGTERM, which would kill them). No MPI, no ranks."""

import signal
import sys
import time

if "--version" in sys.argv:
    sys.exit(0)  # not Open MPI: the launcher adds no Open MPI options
got: list[int] = []
for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(sig, lambda s, _f: got.append(s))
print("\x1b]mpitrain-progress;epoch 1/1, step 1/9;\x07", flush=True)  # parallel/wire.py's progress_line
print("fake mpiexec started", flush=True)
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.02)
name = signal.Signals(got[0]).name if got else "nothing"
print(f"fake mpiexec got {name}", flush=True)
sys.exit(0 if name == "SIGUSR1" else 143)
