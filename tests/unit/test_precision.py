"""--precision: how "auto" is resolved, what stays float32 under a mixed policy, fp16 loss scaling."""

import json
import zipfile

import numpy as np
import pytest

from mpitrain.runtime import POLICIES, resolve_precision

INTEL_BF16 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8
processor\t: 1
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8
"""
AMX_ONLY = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
# An AVX-512 CPU without bfloat16 arithmetic, but with the fp16 one and "bf16" in its name.
NO_BF16 = "processor\t: 0\nmodel name\t: Test bf16-less CPU\nflags\t\t: fpu avx2 avx512f avx512_fp16 avx512_vnni\n"


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [
        (INTEL_BF16, "bf16"),
        (AMX_ONLY, "bf16"),
        (NO_BF16, "fp32"),
        ("", "fp32"),
    ],
    ids=["avx512_bf16", "amx_bf16", "avx512_fp16-only", "no-flags"],
)
def test_auto_resolves_from_the_cpuinfo_flags(cpuinfo, expected):
    precision, why = resolve_precision("auto", cpuinfo=cpuinfo, gpus=[])
    assert precision == expected
    assert why.startswith("auto:") and ("bf16" in why)


def test_gpus_decide_auto_and_an_explicit_choice_is_kept():
    assert resolve_precision("auto", cpuinfo=NO_BF16, gpus=[(8, 0), (9, 0)])[0] == "bf16"
    assert resolve_precision("auto", cpuinfo=INTEL_BF16, gpus=[(8, 6), (7, 0)])[0] == "fp32"  # on the V100
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, cpuinfo=INTEL_BF16 if p == "fp32" else NO_BF16, gpus=[]) == (p, "requested")


@pytest.fixture
def policy():
    """Set Keras' global dtype policy for one test; back to float32 afterwards."""
    from mpitrain.runtime import set_precision

    yield set_precision
    set_precision("fp32")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_every_registry_model_keeps_float32_variables_and_a_float32_softmax(policy, precision):
    from mpitrain.train.models import MODELS, build_model

    policy(precision)
    for name in MODELS:
        model = build_model(name, 16, 2)
        assert model.outputs[0].dtype == "float32", name
        assert {v.dtype for v in model.variables} <= {"float32", "int64"}, name
        compute = {layer.compute_dtype for layer in model.layers[:-1]}
        assert POLICIES[precision].split("_")[1] in compute, name  # the rest really is mixed


def _tiny_data(n=8, size=16):
    rng = np.random.default_rng(0)
    x = rng.random((n, size, size, 1), dtype=np.float32)
    y = (np.arange(n) % 2).astype(np.int32)
    return x, y


def test_the_fused_gradient_buffer_is_float32_under_mixed_bfloat16(policy):
    """Even for a model whose softmax is not float32 (a registry model that forgot it)."""
    import keras
    from keras import layers

    from mpitrain.engine.steps import make_train_step

    policy("bf16")
    model = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.Flatten(),
            layers.Dense(2, activation="softmax"),
        ]
    )
    assert model.outputs[0].dtype == "bfloat16"
    opt = keras.optimizers.SGD(0.1)
    opt.build(model.trainable_variables)
    seen = []

    def reduce(buf):
        seen.append(buf.copy())
        return buf

    step = make_train_step(model, opt, reduce)
    x, y = _tiny_data()
    stats, probs = step(x, y, np.ones(len(y), np.float32), np.float32(0.1))
    assert seen[0].dtype == np.float32
    assert seen[0].size == sum(int(np.prod(v.shape)) for v in model.trainable_variables) + 3
    assert seen[0][-3] == len(y) and np.isfinite(seen[0]).all()
    assert probs.dtype == "float32" and stats.dtype == "float32"
    assert {v.dtype for v in model.variables} == {"float32"}


def test_a_model_saved_after_bf16_training_computes_in_float32_and_loads_in_any_precision(tmp_path, policy):
    from mpitrain.evaluate import modelio
    from mpitrain.train.models import build_model
    from mpitrain.train.runfolder import save_model

    policy("bf16")
    model = build_model("tiny", 16, 2)
    save_model(tmp_path / "model.keras", model)
    # The caller's model is unchanged: still bf16 (training or validation may go on).
    assert model.layers[0].compute_dtype == "bfloat16" and model.dtype_policy.name == "mixed_bfloat16"
    with zipfile.ZipFile(tmp_path / "model.keras") as z:
        text = z.read("config.json").decode()
    policies = {d["config"]["name"] for d in _dtype_entries(json.loads(text))}
    assert policies == {"float32"}, policies  # no layer (nor the model itself) is saved mixed

    policy("fp32")  # an fp32 process
    info = modelio.ModelInfo(tmp_path / "model.keras", ["a", "b"], 16)
    x, _ = _tiny_data()
    net32 = modelio.load_model(info)
    assert {layer.compute_dtype for layer in net32._flatten_layers()} == {"float32"}
    np.testing.assert_array_equal(modelio.predict_probs(net32, x, 2), modelio.predict_probs(_float32_copy(model), x, 2))
    net16 = modelio.load_model(info, "bf16")
    assert net16.layers[0].compute_dtype == "bfloat16" and net16.layers[-1].compute_dtype == "float32"
    p16 = modelio.predict_probs(net16, x, 2)
    assert p16.dtype == np.float32
    np.testing.assert_allclose(p16, modelio.predict_probs(net32, x, 2), atol=0.02)


def _dtype_entries(node):
    """Every serialized DTypePolicy in a Keras config."""
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy":
            yield node
        for v in node.values():
            yield from _dtype_entries(v)
    elif isinstance(node, list):
        for v in node:
            yield from _dtype_entries(v)


def _float32_copy(model):
    from mpitrain.train.models import build_model

    copy = build_model(model.name, model.input_shape[1], model.output_shape[-1])  # under float32
    copy.set_weights(model.get_weights())
    return copy


def _lso_step(overflow_on_another_rank: bool):
    import keras

    from mpitrain.engine.steps import make_train_step
    from mpitrain.train.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model("tiny", 16, 2)
    # A small initial scale: whatever the initial weights, this fp16 step does not overflow.
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.5), initial_scale=2.0**8)
    opt.build(model.trainable_variables)

    def reduce(buf):  # the allreduce: another rank's fp16 gradient overflowed, or not
        out = buf.copy()
        if overflow_on_another_rank:
            out[0] = np.inf
        return out

    before = [v.numpy().copy() for v in model.trainable_variables]
    x, y = _tiny_data()
    make_train_step(model, opt, reduce)(x, y, np.ones(len(y), np.float32), np.float32(0.5))
    return model, opt, before, x, y


def test_fp16_skips_a_step_whose_reduced_gradient_overflowed_on_any_rank(policy):
    policy("fp16")
    model, opt, before, _, _ = _lso_step(overflow_on_another_rank=True)
    for v, b in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(v.numpy(), b)  # skipped, though this rank's gradient was finite
    assert float(opt.dynamic_scale.numpy()) == opt.initial_scale / 2
    assert int(opt.iterations.numpy()) == 0


def test_fp16_applies_the_unscaled_gradient_of_the_mean_loss(policy):
    import keras

    policy("fp16")
    model, opt, before, x, y = _lso_step(overflow_on_another_rank=False)
    assert float(opt.dynamic_scale.numpy()) == opt.initial_scale and int(opt.iterations.numpy()) == 1
    # The same SGD step in float32 from the same weights: the fp16 step moved the weights alike.
    policy("fp32")
    ref = _float32_copy(model)
    ref.set_weights(before)
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, ref(x, training=True)))
    grads = tape.gradient(loss, ref.trainable_variables)
    # fp16 activations move single entries (a max-pool picks another pixel), not the whole:
    # a missing unscale, or a loss that was not scaled, would be off by 256x.
    moved = np.concatenate([(v.numpy() - b).ravel() for v, b in zip(model.trainable_variables, before)])
    want = np.concatenate([-0.5 * g.numpy().ravel() for g in grads])
    assert np.linalg.norm(moved - want) <= 0.2 * np.linalg.norm(want)
