import math
import time
import warnings

import keras
import numpy as np
import pytest

from tl_keras import backbones

STRIDES = {"early": 4, "middle": 8, "late": 16}
SEED_CNN_STRIDES = {"early": 2, "middle": 4, "late": 8}  # a pool after each conv, no stem


@pytest.mark.slow
def test_every_named_cut_is_a_real_layer_at_its_stride():
    # Built one after another in one process: this also proves that Keras'
    # automatic layer names ("add_2", "activation_17") do not depend on the
    # models built before.
    for name, spec in backbones.BACKBONES.items():
        # Valid padding shrinks small inputs too much to read their strides.
        size = spec.image_size if name in ("inception_v3", "xception") else 64
        built = backbones.build_backbone(name, weights="none", image_size=size, cut="early")
        assert built.layer == spec.cuts["early"]
        base = built.base
        assert spec.cuts["top"] == base.layers[-1].name, name
        for cut, stride in (SEED_CNN_STRIDES if name == "seed_cnn" else STRIDES).items():
            layer = backbones.get_operation(base, spec.cuts[cut])
            measured = size / layer.output.shape[1]
            assert round(math.log2(measured)) == math.log2(stride), (name, cut, measured)


def test_cut_on_own_graph_gives_stage_output():
    built = backbones.build_backbone("resnet50", weights="none", image_size=64, cut="middle")
    assert built.layer == "conv3_block4_out"
    assert tuple(built.model.output.shape) == (None, 8, 8, 512)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    reference = keras.Model(built.base.input, built.base.get_layer("conv3_block4_out").output)
    np.testing.assert_allclose(built.model.predict(x, verbose=0),
                               reference.predict(x, verbose=0), atol=1e-5)


def test_any_layer_name_is_a_cut():
    built = backbones.build_backbone("mobilenet_v2", weights="none", image_size=32,
                                     cut="block_3_expand_relu")
    assert built.layer == "block_3_expand_relu"
    assert built.model.output.shape[-1] == 144


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid backbones: efficientnet_lite0, .*mobilenet_v2, .*vgg16"):
        backbones.build_backbone("resnet5O", weights="none", image_size=32)
    with pytest.raises(ValueError) as e:
        backbones.build_backbone("resnet50", weights="none", image_size=64,
                                 cut="conv3_block4_outt")
    message = str(e.value)
    assert "early, middle, late, top" in message
    assert "conv3_block4_out" in message  # nearest layer name


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0",
                                  "vgg16", "xception"])
def test_preprocess_affine_equals_preprocess_input(name):
    kernel, bias = backbones.preprocess_affine(name)
    x = np.random.default_rng(1).uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    want = np.asarray(backbones.BACKBONES[name].preprocess_input(x.copy()))
    np.testing.assert_allclose(x @ kernel + bias, want, rtol=1e-5, atol=1e-4)


def test_weights_from_file(tmp_path):
    keras.utils.set_random_seed(3)
    first = backbones.build_backbone("mobilenet_v3_small", weights="none", image_size=32)
    path = str(tmp_path / "b.weights.h5")
    first.base.save_weights(path)
    keras.utils.set_random_seed(4)
    loaded = backbones.build_backbone("mobilenet_v3_small", weights=path, image_size=32)
    for a, b in zip(first.base.weights, loaded.base.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="not 'imagenet', 'none' or an existing"):
        backbones.build_backbone("mobilenet_v3_small", weights=str(tmp_path / "nope.h5"))


def test_weights_of_another_backbone_are_one_error_not_warnings(tmp_path):
    path = str(tmp_path / "small.weights.h5")
    backbones.build_backbone("mobilenet_v3_small", weights="none", image_size=32).base \
        .save_weights(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError) as error:
            backbones.build_backbone("mobilenet_v2", weights=path, image_size=32)
    assert str(error.value) == (
        f"could not load weights {path!r} into 'mobilenet_v2' built with include_top=False: "
        "99 layers do not match it; was it saved from another backbone?")
    assert not caught  # Keras' ~95 lines of warnings are not passed on
    (tmp_path / "junk.weights.h5").write_text("not HDF5")
    with pytest.raises(ValueError, match="is it a Keras .weights.h5 file"):
        backbones.build_backbone("mobilenet_v2", weights=str(tmp_path / "junk.weights.h5"),
                                 image_size=32)


def test_imagenet_without_network_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example/weights.h5: None -- "
                        "[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.src.utils.file_utils, "get_file", offline)
    start = time.time()
    with pytest.raises(ValueError) as e:
        backbones.build_backbone("resnet50", weights="imagenet", image_size=64)
    assert time.time() - start < 30
    assert "could not download ImageNet weights for 'resnet50'" in str(e.value)
    for hint in ("network", "--weights=none", "--weights=PATH.weights.h5", "efficientnet_lite0"):
        assert hint in str(e.value)


def test_seed_cnn_cuts_at_every_layer_boundary_and_takes_its_own_weights(tmp_path):
    from tl_keras import model as model_lib

    shapes = {"conv1": (16, 16, 16), "conv2": (8, 8, 32), "conv3": (4, 4, 32), "fc1": (256,),
              "fc2": (128,)}
    for cut, named in (("early", "conv1"), ("middle", "conv2"), ("late", "conv3"),
                       ("top", "fc2"), *((c, c) for c in shapes)):
        built = backbones.build_backbone("seed_cnn", weights="none", image_size=32, cut=cut)
        assert tuple(built.model.output.shape[1:]) == shapes[named], cut
    # A cut after a Dense layer feeds the head directly: nothing to pool.
    built = backbones.build_backbone("seed_cnn", weights="none", image_size=32, cut="fc1")
    classifier = model_lib.build_classifier(built.model, "seed_cnn", num_classes=3, channels=1)
    names = [layer.name for layer in classifier.layers]
    assert names == ["images", "preprocess", "backbone", "feature_norm", "dropout", "predictions"]
    x = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 1)).astype("float32")
    assert classifier.predict(x, verbose=0).shape == (2, 3)
    # The backbone of a trained classifier (cut at top) is a --weights file for seed_cnn.
    keras.utils.set_random_seed(5)
    top = backbones.build_backbone("seed_cnn", weights="none", image_size=32, cut="top")
    path = str(tmp_path / "seed_cnn.weights.h5")
    top.model.save_weights(path)
    loaded = backbones.build_backbone("seed_cnn", weights=path, image_size=32, cut="conv2")
    for layer in ("conv1", "conv2"):
        for a, b in zip(top.base.get_layer(layer).weights, loaded.base.get_layer(layer).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ValueError, match="seed_cnn has no ImageNet weights"):
        backbones.build_backbone("seed_cnn", weights="imagenet", image_size=32)
