"""mpitrain: train Keras 3 image classifiers across processes and machines over MPI.

The public face: `mpitrain.fit(model, x, y, validation_data=..., epochs=..., ...)` trains a
Keras model in place on every rank of the job (`mpiexec -n N python script.py`, or one
process) on arrays, a dataset, or a folder or label CSV (`mpitrain.fit(model, "data/",
out="runs/a")` writes the run folder `mpitrain train` writes: `api.py`),
`mpitrain.Engine` is the loop behind it and behind `mpitrain train`, and the
callbacks (`KeepBest`, `EarlyStopping`, `FreezeBackbone`, `TensorBoard`, `ProgressBar`, or
your own `Callback`) run on every rank with the global epoch numbers. `rank()` and `size()` say
where this process stands; `allreduce` and `broadcast` serve a loop of your own
(`tf.GradientTape`). Names load on first use, so `import mpitrain` (and the command
line) does not import TensorFlow.
"""

from __future__ import annotations

__version__ = "0.1.0"

_ENGINE = ("Callback", "EarlyStopping", "Engine", "FreezeBackbone", "InMemory", "KeepBest", "Options", "ProgressBar",
           "Result", "TensorBoard", "allreduce", "broadcast")  # fmt: skip
_ERRORS = ("StopRequested", "UserError")  # what fit raises on purpose: a stop request, a wrong value
__all__ = ["__version__", "rank", "size", *_ENGINE, "fit", *_ERRORS]


def rank() -> int:
    """This process's rank in the job: 0 in a plain `python script.py`."""
    from mpitrain.parallel.comm import world

    return world().rank


def size() -> int:
    """The number of processes in the job: 1 in a plain `python script.py`."""
    from mpitrain.parallel.comm import world

    return world().size


def __getattr__(name: str):
    if name in _ENGINE:
        import mpitrain.engine as engine

        return getattr(engine, name)
    if name == "fit":
        from mpitrain.api import fit

        return fit
    if name in _ERRORS:
        import mpitrain.errors as errors

        return getattr(errors, name)
    raise AttributeError(f"module 'mpitrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
