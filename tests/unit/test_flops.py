"""FLOPs counted from a model's layers (train/flops.py), against counts done by hand."""

import pytest

from mpitrain.runtime import import_tensorflow

import_tensorflow()


def test_a_tiny_conv_and_dense_model_counted_by_hand():
    import keras
    from keras import layers

    from mpitrain.train.flops import count_flops

    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            layers.Conv2D(2, 3, activation="relu", name="conv"),  # valid: 4x4x2 out
            layers.MaxPooling2D(2, name="pool"),  # 2x2x2 out
            layers.Flatten(name="flat"),  # 8
            layers.Dense(3, activation="relu", name="hidden"),
            layers.Dense(2, activation="softmax", name="out"),
        ]
    )
    c = count_flops(model)
    conv = 2 * (3 * 3 * 1 * 2) * (4 * 4) + 32 + 32  # multiply-adds x2, bias, relu over 4x4x2
    pool = 4 * 8  # a 2x2 window per output value
    hidden = 2 * 8 * 3 + 3 + 3
    out = 2 * 3 * 2 + 2 + 3 * 2  # softmax: 3 per value
    assert c.per_layer == {"conv": conv, "pool": pool, "flat": 0, "hidden": hidden, "out": out}
    assert c.forward == 746 == conv + pool + hidden + out
    assert c.train == 3 * 746 and c.uncounted == []


def test_strides_padding_no_bias_groups_and_batch_norm_layers():
    import keras
    from keras import layers

    from mpitrain.train.flops import count_flops

    inputs = keras.Input((8, 8, 2))
    x = layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False, name="c1")(inputs)  # 4x4x4
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.Conv2D(4, (1, 3), padding="same", groups=2, name="grouped")(x)  # 4x4x4, 2 in per group
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.5, name="drop")(x)
    outputs = layers.Dense(2, name="logits")(x)  # no activation
    c = count_flops(keras.Model(inputs, outputs))
    assert c.per_layer["c1"] == 2 * (3 * 3 * 2 * 4) * 16
    assert c.per_layer["bn"] == 4 * 64 and c.per_layer["relu"] == 64
    assert c.per_layer["grouped"] == 2 * (1 * 3 * 2 * 4) * 16 + 64
    assert c.per_layer["gap"] == 64 and c.per_layer["drop"] == 4
    assert c.per_layer["logits"] == 2 * 4 * 2 + 2


def test_the_seed_cnn_at_50_px():
    from mpitrain.train.flops import count_flops
    from mpitrain.train.models import build_model

    c = count_flops(build_model("seed", 50, 2))
    convs = [
        2 * 9 * 1 * 32 * 50 * 50 + 2 * 32 * 50 * 50,  # 50x50x32, bias and relu
        2 * 9 * 32 * 64 * 25 * 25 + 2 * 64 * 25 * 25,  # 25x25x64
        2 * 9 * 64 * 64 * 12 * 12 + 2 * 64 * 12 * 12,
    ]  # 12x12x64
    pools = [4 * 25 * 25 * 32, 4 * 12 * 12 * 64, 4 * 6 * 6 * 64]
    dense = [2 * 2304 * 128 + 2 * 128, 128, 2 * 128 * 2 + 2 + 3 * 2]  # hidden, dropout, softmax
    assert c.forward == sum(convs) + sum(pools) + sum(dense) == 36_072_072
    assert c.train == 108_216_216


def test_an_unknown_layer_is_named_not_silently_counted():
    import keras
    from keras import layers

    from mpitrain.train.flops import count_flops

    model = keras.Sequential(
        [keras.Input((4, 4, 1)), layers.Conv2DTranspose(1, 3, name="up"), layers.Flatten(), layers.Dense(2, name="d")]
    )
    c = count_flops(model)
    assert c.uncounted == ["up"] and c.per_layer["up"] == 0
    assert c.forward == c.per_layer["d"] == 2 * 36 * 2 + 2


@pytest.mark.parametrize("name,size", [("seed", 50), ("tiny", 16), ("xray", 64)])
def test_every_registry_model_is_counted_whole(name, size):
    from mpitrain.train.flops import count_flops
    from mpitrain.train.models import build_model

    c = count_flops(build_model(name, size, 2))
    assert c.uncounted == [] and c.forward > 0


def test_depthwise_separable_merges_scaling_and_a_nested_backbone_by_hand():
    import keras
    from keras import layers

    from mpitrain.train.flops import count_flops

    inner_in = keras.Input((6, 6, 2))
    a = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(inner_in)  # 6x6x2
    b = layers.SeparableConv2D(4, 3, padding="same", name="sep")(inner_in)  # 6x6x4
    b = layers.Conv2D(2, 1, use_bias=False, name="pw")(b)  # back to 6x6x2
    merged = layers.Add(name="add")([a, b])
    backbone = keras.Model(inner_in, layers.ZeroPadding2D(1, name="pad")(merged), name="backbone")
    inputs = keras.Input((6, 6, 2))
    x = layers.Rescaling(255.0, name="scale")(inputs)
    x = backbone(x)
    x = layers.Concatenate(name="cat")([x, x])  # 8x8x4
    x = layers.LayerNormalization(name="ln")(x)
    outputs = layers.Dense(2, name="d")(layers.GlobalAveragePooling2D(name="gap")(x))
    c = count_flops(keras.Model(inputs, outputs))
    assert c.uncounted == []
    assert c.per_layer["scale"] == 2 * 72
    assert c.per_layer["backbone/dw"] == 2 * 9 * 72  # one 3x3 window per output value
    assert c.per_layer["backbone/sep"] == 2 * 9 * 2 * 36 + 2 * 2 * 4 * 36 + 4 * 36  # depthwise, pointwise, bias
    assert c.per_layer["backbone/pw"] == 2 * 4 * 2 * 36
    assert c.per_layer["backbone/add"] == 72 and c.per_layer["backbone/pad"] == 0
    assert c.per_layer["cat"] == 0 and c.per_layer["ln"] == 5 * 256 and c.per_layer["gap"] == 256
    assert c.forward == sum(c.per_layer.values())
    assert "backbone" not in c.per_layer  # the nested model counted by its layers, not as one


def test_a_keras_applications_backbone_is_counted_through():
    from mpitrain.train.flops import count_flops
    from mpitrain.train.models import build_model

    c = count_flops(build_model("mobilenet_v3_small", 96, 2, 3))
    assert c.uncounted == []
    # MobileNetV3Small is ~56 M multiply-adds at 224 px (Howard et al. 2019): at 96 px,
    # (96/224)^2 of it, x2 FLOPs per multiply-add, within the head's and the activations' extra.
    assert 0.9 * 2 * 56e6 * (96 / 224) ** 2 < c.forward < 1.25 * 2 * 56e6 * (96 / 224) ** 2
