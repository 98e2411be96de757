"""The training engine: a Keras model, arrays and options in, trained in place on every rank.

Imports neither `data/`, `evaluate/` nor `train/` (tests/unit/test_layers.py): it knows
nothing of folders, plans or the chest X-rays.
"""

from mpitrain.engine.callbacks import Callback, EarlyStopping, FreezeBackbone, KeepBest, ProgressBar, TensorBoard
from mpitrain.engine.collectives import allreduce, broadcast
from mpitrain.engine.fit import fit
from mpitrain.engine.loop import Arrays, Engine, InMemory, Result
from mpitrain.engine.options import Options

__all__ = [
    "Arrays",
    "Callback",
    "EarlyStopping",
    "Engine",
    "FreezeBackbone",
    "InMemory",
    "KeepBest",
    "Options",
    "ProgressBar",
    "Result",
    "TensorBoard",
    "allreduce",
    "broadcast",
    "fit",
]
