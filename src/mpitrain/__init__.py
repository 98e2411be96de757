"""mpitrain: train Keras 3 image classifiers across processes and machines over MPI."""

__version__ = "0.1.0"
