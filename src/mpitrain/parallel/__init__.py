"""Distribution: the comm layer (the one mpi4py user), strategies, launcher, watchdog."""
