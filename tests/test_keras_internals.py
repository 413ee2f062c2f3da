"""The private Keras and TensorFlow APIs tl_keras uses fail clearly on a version they were
not tested with."""

import keras
import pytest

from tl_keras import backbones, keras_internals


def test_the_installed_versions_are_the_tested_ones():
    import keras_tuner

    keras_internals.check_version("keras", keras.__version__, "anything")
    keras_internals.check_version("keras_tuner", keras_tuner.__version__, "anything")
    assert keras_internals.save_best_epoch_class().__name__ == "SaveBestEpoch"
    import tensorflow as tf

    keras_internals.check_version("tensorflow", tf.__version__, "anything")


def test_another_tensorflow_is_one_clear_error_where_a_pass_is_folded(monkeypatch):
    import tensorflow as tf

    from tl_keras import folded

    monkeypatch.setattr(tf, "__version__", "2.22.0")
    inputs = keras.Input((3,))
    with pytest.raises(RuntimeError) as e:
        folded.fold(keras.Model(inputs, keras.layers.Dense(2)(inputs)))
    assert str(e.value) == (
        "tl_keras uses a private tensorflow API (convert_to_constants."
        "_replace_variables_by_constants) tested with tensorflow 2.21.x, and tensorflow 2.22.0 "
        "is installed; install 'tensorflow>=2.21,<2.22' (as setup.cfg pins it)")


def test_another_keras_is_one_clear_error_where_a_private_api_is_used(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.16.0")
    with pytest.raises(RuntimeError) as e:
        backbones.build_backbone("mobilenet_v3_small", weights="none", image_size=32)
    assert str(e.value) == (
        "tl_keras uses a private keras API (keras.src.backend.common.global_state) tested "
        "with keras 3.15.x, and keras 3.16.0 is installed; install 'keras>=3.15,<3.16' "
        "(as setup.cfg pins it)")

