"""Fused flat buffers (parallel/flat.py): many variables <-> one float32 buffer."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")

from mpitrain.parallel.flat import FlatVars, float_vars  # noqa: E402

# Shapes of every kind: scalar, vector, matrix, 4-D kernel, empty; dtypes the buffer must carry.
SPECS = [
    ((), "float32"),
    ((5,), "float64"),
    ((2, 3), "float16"),
    ((3, 3, 1, 4), "float32"),
    ((0,), "float32"),
    ((4, 1), "float64"),
]


def _variables(seed=0):
    rng = np.random.default_rng(seed)
    # values exactly representable in float16, so every dtype survives the float32 trip
    return [keras.Variable(np.round(rng.normal(size=shape) * 64) / 64, dtype=dtype) for shape, dtype in SPECS]


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def test_layout_of_the_buffer():
    flat = FlatVars(_variables())
    sizes = [int(np.prod(s)) for s, _ in SPECS]
    assert flat.shapes == [s for s, _ in SPECS]
    assert flat.sizes == sizes
    assert flat.offsets == [0, *np.cumsum(sizes).tolist()]
    assert flat.size == sum(sizes) and flat.buffer.shape == (sum(sizes),)
    assert flat.buffer.dtype == np.float32


def test_pack_puts_each_variable_at_its_offset_in_order():
    variables = _variables()
    flat = FlatVars(variables)
    buf = flat.pack()
    expected = np.concatenate([v.reshape(-1).astype(np.float32) for v in _values(variables)])
    assert np.array_equal(buf, expected)
    for v, a, b in zip(variables, flat.offsets[:-1], flat.offsets[1:]):
        assert np.array_equal(buf[a:b].reshape(v.shape), np.asarray(v.numpy(), np.float32))


def test_round_trip_into_other_variables_keeps_shapes_dtypes_and_values():
    src, dst = _variables(0), _variables(1)
    assert not all(np.array_equal(a, b) for a, b in zip(_values(src), _values(dst)))
    buf = FlatVars(src).pack().copy()
    FlatVars(dst).unpack(buf)
    for s, d, (shape, dtype) in zip(src, dst, SPECS):
        assert tuple(d.shape) == shape and str(d.dtype) == dtype
        assert np.array_equal(np.asarray(d.numpy()), np.asarray(s.numpy()))


def test_pack_and_unpack_work_in_place_on_one_reused_buffer():
    variables = _variables()
    flat = FlatVars(variables)
    buf = flat.buffer
    assert flat.pack() is buf  # no new buffer per exchange: MPI works on this memory
    buf *= 2  # what an in-place collective does to the buffer
    flat.unpack()  # default: from the flat's own buffer
    assert flat.buffer is buf
    for v, before in zip(variables, _values(_variables())):
        assert np.array_equal(np.asarray(v.numpy()), 2 * before)
    assert np.array_equal(flat.pack(), buf) and flat.pack() is buf


def test_checksum_sees_every_variable():
    variables = _variables()
    flat = FlatVars(variables)
    first = flat.checksum()
    assert first == FlatVars(_variables()).checksum()  # same values, same digest
    variables[-1].assign(variables[-1].numpy() + 1)
    assert flat.checksum() != first


def test_float_vars_keeps_only_float_variables():
    f32, f64 = keras.Variable(np.zeros(2), dtype="float32"), keras.Variable(np.zeros(2), dtype="float64")
    count = keras.Variable(0, dtype="int64")
    assert [id(v) for v in float_vars([f32, count, f64])] == [id(f32), id(f64)]


def test_no_variables():
    flat = FlatVars([])
    assert flat.size == 0 and flat.pack().shape == (0,)
    flat.unpack()
