import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import TINY_BACKBONE, TINY_SIZE
from tl_keras import backbones, model as model_lib


def tiny_model(channels=3, name=TINY_BACKBONE, num_classes=4):
    cut = backbones.build_backbone(name, weights="none", image_size=TINY_SIZE)
    return model_lib.build_classifier(cut.model, name, num_classes, channels=channels, seed=0)


def test_head_is_a_new_dense_named_predictions():
    model = tiny_model(num_classes=4)
    head = model.get_layer("predictions")
    assert isinstance(head, keras.layers.Dense)
    assert head.units == 4
    assert [layer.name for layer in model.layers[-4:]] == [
        "avg_pool", "feature_norm", "dropout", "predictions"]
    x = np.random.default_rng(0).integers(0, 256, (3, TINY_SIZE, TINY_SIZE, 3))
    probabilities = model.predict(x.astype("uint8"), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("size", range(1, 30))
def test_grid_window_gives_the_grid(size):
    window, stride = model_lib.grid_window(size, 3)
    assert (size - window) // stride + 1 == min(size, 3)
    assert window >= stride  # every cell is inside some window


def test_grid_pooling_keeps_where_features_are():
    cut = backbones.build_backbone(TINY_BACKBONE, weights="none", image_size=TINY_SIZE,
                                   cut="early")  # an 8x8 map of 16 channels at 32 px
    model = model_lib.build_classifier(cut.model, TINY_BACKBONE, 3, seed=0, pool_grid=3)
    assert model.get_layer("feature_norm").input.shape[-1] == 3 * 3 * 16
    grid = keras.Model(model.input, model.get_layer("grid_pool").output)
    maps = keras.Model(model.input, model.get_layer("grid_pool").input)
    x = np.random.default_rng(0).integers(0, 256, (2, TINY_SIZE, TINY_SIZE, 3)).astype("uint8")
    window, stride = model_lib.grid_window(8, 3)
    m = maps.predict(x, verbose=0)
    corner = m[:, 2 * stride:2 * stride + window, 0:window].mean(axis=(1, 2))
    np.testing.assert_allclose(grid.predict(x, verbose=0)[:, 2, 0], corner, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pool_grid must be 1"):
        model_lib.build_classifier(cut.model, TINY_BACKBONE, 3, pool_grid=0)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_preprocessing_inside_equals_preprocess_input(name):
    model = tiny_model(name=name, channels=1)
    preprocess = keras.Model(model.input, model.get_layer("preprocess").output)
    grey = np.random.default_rng(0).integers(0, 256, (2, TINY_SIZE, TINY_SIZE, 1))
    rgb = np.repeat(grey, 3, axis=-1).astype("float32")
    want = backbones.BACKBONES[name].preprocess_input(rgb.copy())
    np.testing.assert_allclose(preprocess.predict(grey.astype("uint8"), verbose=0), want,
                               rtol=1e-5, atol=1e-4)


def test_uint8_and_float_inputs_and_alpha_give_the_same_output():
    rgb_model = tiny_model(channels=3)
    rgba_model = tiny_model(channels=4)
    x = np.random.default_rng(0).integers(0, 256, (2, TINY_SIZE, TINY_SIZE, 3)).astype("uint8")
    np.testing.assert_allclose(rgb_model.predict(x, verbose=0),
                               rgb_model.predict(x.astype("float32"), verbose=0), atol=1e-6)
    # An alpha channel is dropped: same backbone and head weights, same output.
    for a, b in zip(rgb_model.layers[2:], rgba_model.layers[2:]):
        b.set_weights(a.get_weights())
    alpha = np.concatenate([x, np.full(x.shape[:-1] + (1,), 255, "uint8")], axis=-1)
    np.testing.assert_allclose(rgba_model.predict(alpha, verbose=0),
                               rgb_model.predict(x, verbose=0), atol=1e-6)


@pytest.mark.slow  # a new Python without tl_keras (docs/testing.md)
def test_saved_model_runs_without_tl_keras(tmp_path):
    model = tiny_model(channels=1)
    x = np.random.default_rng(0).integers(0, 256, (2, TINY_SIZE, TINY_SIZE, 1)).astype("uint8")
    path = str(tmp_path / "model.keras")
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", model.predict(x, verbose=0))
    script = (
        "import sys, numpy as np\n"
        "class Block:\n"  # even where tl_keras is pip-installed, it cannot be imported
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'tl_keras': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import keras\n"
        f"m = keras.saving.load_model({path!r})\n"
        f"got = m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0)\n"
        f"np.testing.assert_allclose(got, np.load({str(tmp_path / 'want.npy')!r}), atol=1e-6)\n"
        "assert not any(m.startswith('tl_keras') for m in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
