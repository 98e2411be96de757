"""The engine's callbacks, one per file, Keras-style."""

from mpitrain.engine.callbacks.base import Callback
from mpitrain.engine.callbacks.early_stopping import EarlyStopping
from mpitrain.engine.callbacks.freeze_backbone import FreezeBackbone
from mpitrain.engine.callbacks.keep_best import KeepBest
from mpitrain.engine.callbacks.progress import ProgressBar
from mpitrain.engine.callbacks.tensorboard import TensorBoard

__all__ = ["Callback", "EarlyStopping", "FreezeBackbone", "KeepBest", "ProgressBar", "TensorBoard"]
