import numpy as np
import pytest

from mpitrain.errors import UserError
from mpitrain.train.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("classes", [2, 3])
def test_models_map_images_to_class_probabilities(name, classes):
    model = build_model(name, 24, classes)
    assert model.input_shape == (None, 24, 24, 1)
    assert model.output_shape == (None, classes)
    probs = np.asarray(model(np.random.default_rng(0).random((5, 24, 24, 1), dtype=np.float32)))
    assert probs.shape == (5, classes)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_seed_model_has_one_hidden_dense_layer_after_convolutions():
    import keras

    layers = build_model("seed", 50, 2).layers
    dense = [x for x in layers if isinstance(x, keras.layers.Dense)]
    convs = [x for x in layers if isinstance(x, keras.layers.Conv2D)]
    assert len(dense) == 2 and len(convs) >= 2  # one hidden dense layer + the softmax output


def test_too_small_images_unknown_models_and_one_class_are_user_errors():
    with pytest.raises(UserError, match="too small"):
        build_model("seed", 6, 2)
    with pytest.raises(UserError, match="unknown model"):
        build_model("vgg99", 50, 2)
    with pytest.raises(UserError, match="2 classes"):
        build_model("seed", 50, 1)
