"""Floating-point operations of a model, counted from its layers (for `mpitrain bench`).

Why count: images/s alone does not say whether a step is slow because the machine is slow
or because the step wastes it. FLOPs per image times images/s is the arithmetic rate the
step achieves, comparable with what the processor can do (and with other models).

The convention, per image:

* a multiply-add is 2 FLOPs: Conv2D 2 x kh x kw x (C_in / groups) x C_out per output
  position, Dense 2 x in x out; a bias adds 1 and an activation 1 per output value
  (softmax 3: exp, sum, divide);
* BatchNormalization 4 per value (subtract the mean, scale, shift, and the statistics'
  sum), ReLU / Activation 1, Dropout 1 (the mask multiply), max or average pooling one per
  input value in a window (pool_h x pool_w per output value), global pooling one per input
  value; Flatten, Reshape and the input layer 0;
* DepthwiseConv2D 2 x kh x kw per output value; SeparableConv2D its depthwise and pointwise
  parts; Add / Multiply / Subtract / Average / Maximum / Minimum (inputs - 1) per output
  value; Rescaling and Normalization 2 per value (scale, shift), LayerNormalization 5;
  padding, cropping, Concatenate and Permute 0; a nested model (a keras.applications backbone) the sum of its own layers;
* a training step is counted as 3 x the forward pass (forward, then the gradients with
  respect to the activations and to the weights, each about as costly as the forward
  pass): the usual approximation (e.g. Kaplan et al. 2020), not a count of the backward
  kernels. The optimizer update (Adam: ~10 FLOPs per parameter per step, shared by the
  batch) and the loss are left out; they are < 1 % for the registry models at batch 32.

Layers of a type not listed are counted as 0 and named in `uncounted`, so a new layer type
shows up as a visible gap rather than as a silently wrong total.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BACKWARD_FACTOR = 3  # training step = forward + ~2x forward for the backward pass


@dataclass
class FlopCount:
    forward: int = 0  # FLOPs of one image's forward pass
    per_layer: dict = field(default_factory=dict)  # layer name -> forward FLOPs
    uncounted: list = field(default_factory=list)  # names of layers of an unknown type

    @property
    def train(self) -> int:
        """FLOPs of one image in a training step (forward x3, see the module docstring)."""
        return BACKWARD_FACTOR * self.forward


def _elements(shape) -> int:
    return int(np.prod([d for d in shape[1:]], dtype=np.int64))  # without the batch axis


def _activation_flops(layer, out_values: int) -> int:
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", "linear")
    if name == "linear":
        return 0
    return (3 if name == "softmax" else 1) * out_values


def _shape(t):
    if isinstance(t, (list, tuple)) and t and not isinstance(t[0], (int, type(None))):
        t = t[0]  # a layer with several inputs: the first (none of ours has several)
    return tuple(t.shape)


def layer_flops(layer) -> int | None:
    """Forward FLOPs of one image through `layer` (a built Keras layer in a built model),
    or None for a layer type this module does not know."""
    kind = type(layer).__name__
    if kind in (
        "InputLayer",
        "Flatten",
        "Reshape",
        "Permute",
        "Identity",
        "ZeroPadding2D",
        "Cropping2D",
        "Concatenate",
    ):
        return 0
    out_shape = _shape(layer.output)
    in_shape = _shape(layer.input)
    out_values = _elements(out_shape)
    if kind == "Conv2D":
        kh, kw = layer.kernel_size
        c_in = in_shape[-1] if layer.data_format == "channels_last" else in_shape[1]
        c_out = layer.filters
        positions = out_values // c_out
        macs = kh * kw * (c_in // layer.groups) * c_out * positions
        return 2 * macs + (out_values if layer.use_bias else 0) + _activation_flops(layer, out_values)
    if kind == "DepthwiseConv2D":
        kh, kw = layer.kernel_size
        return 2 * kh * kw * out_values + (out_values if layer.use_bias else 0) + _activation_flops(layer, out_values)
    if kind == "SeparableConv2D":
        kh, kw = layer.kernel_size
        c_in = in_shape[-1] if layer.data_format == "channels_last" else in_shape[1]
        positions = out_values // layer.filters
        depthwise = 2 * kh * kw * c_in * layer.depth_multiplier * positions
        pointwise = 2 * c_in * layer.depth_multiplier * layer.filters * positions
        bias = out_values if layer.use_bias else 0
        return depthwise + pointwise + bias + _activation_flops(layer, out_values)
    if kind in ("Add", "Multiply", "Subtract", "Average", "Maximum", "Minimum"):
        inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        return max(len(inputs) - 1, 1) * out_values
    if kind in ("Rescaling", "Normalization"):
        return 2 * out_values
    if kind == "LayerNormalization":
        return 5 * out_values  # mean, variance, normalise, scale, shift
    if kind == "Dense":
        n_in = in_shape[-1]
        rows = out_values // layer.units  # a Dense on a sequence applies per position
        return (
            2 * n_in * layer.units * rows + (out_values if layer.use_bias else 0) + _activation_flops(layer, out_values)
        )
    if kind == "BatchNormalization":
        return 4 * out_values
    if kind in ("ReLU", "Activation", "LeakyReLU", "ELU", "Softmax"):
        return (
            3 if kind == "Softmax" or getattr(getattr(layer, "activation", None), "__name__", "") == "softmax" else 1
        ) * out_values
    if kind == "Dropout":
        return out_values
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        ph, pw = layer.pool_size
        return ph * pw * out_values
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        return _elements(in_shape)
    return None


def count_flops(model) -> FlopCount:
    """Forward FLOPs per image of every layer of `model` (Sequential or functional, built;
    a nested model's layers named `outer/inner`)."""
    count = FlopCount()
    for layer in model.layers:
        if hasattr(layer, "layers") and hasattr(layer, "inputs"):  # a nested model
            inner = count_flops(layer)
            count.uncounted += [f"{layer.name}/{name}" for name in inner.uncounted]
            count.per_layer.update({f"{layer.name}/{k}": v for k, v in inner.per_layer.items()})
            count.forward += inner.forward
            continue
        n = layer_flops(layer)
        if n is None:
            count.uncounted.append(layer.name)
            n = 0
        count.per_layer[layer.name] = n
        count.forward += n
    return count
