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


def test_saving_lists_the_attributes_it_skips_once_and_saves_the_same(tmp_path, monkeypatch):
    """Keras 3.15's saver builds a bare reference `Layer()` to list the attributes it
    skips; its cache of them is looked up under another key than it is stored, so
    without `cache_saving_skipsets` every save builds one per object walked."""
    import importlib

    import numpy as np
    from keras.src.layers.layer import Layer

    importlib.import_module("tl_keras.model")  # installs the cache when imported

    bare = []
    init = Layer.__init__

    def counting_init(self, *args, **kwargs):
        if type(self) is Layer:
            bare.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Layer, "__init__", counting_init)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dropout(0.1)(hidden)))
    model.compile("adam", "mse")
    model.fit(np.ones((4, 4)), np.zeros((4, 2)), verbose=0)  # the optimizer's variables too
    model.save(tmp_path / "first.keras")
    first = len(bare)
    model.save(tmp_path / "again.keras")
    model.save_weights(tmp_path / "again.weights.h5")
    assert first <= 3 and len(bare) == first  # at most once per kind, then never again
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    loaded = keras.saving.load_model(tmp_path / "again.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    for saved, kept in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(saved, kept)


def _classifier(**compile_kwargs):
    """A compiled one-Dense-layer classifier and 8 examples (x, y) for it."""
    import numpy as np

    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = np.arange(8) % 2
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"],
                  **compile_kwargs)
    return model, x, y


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.x[4 * i:4 * i + 4], self.y[4 * i:4 * i + 4]


@pytest.mark.parametrize("data", ["pipeline", "py_dataset", "batch"])
def test_a_train_step_is_traced_once_when_built_first(data, monkeypatch):
    """Keras' TensorFlow trainer on one device creates the optimizer's and the metrics'
    variables inside the step's first trace, which tf.function then traces again."""
    import tensorflow as tf

    from conftest import traced
    from tl_keras import devices

    traces = []
    step = keras.Model.train_step
    monkeypatch.setattr(keras.Model, "train_step",
                        lambda self, batch: traces.append(1) or step(self, batch))
    model, x, y = _classifier()
    with traced():
        if data == "pipeline":  # train.py's phases
            pipeline = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
            devices.Devices(None).fit(model, pipeline, pipeline, epochs=2, verbose=0)
        elif data == "py_dataset":  # the advisor's frozen pilots
            keras_internals.build_before_tracing(model, _Batches(x, y))
            model.fit(_Batches(x, y), epochs=2, verbose=0)
        else:  # lr_find's range test
            keras_internals.build_before_tracing(model, (x[:4], y[:4]))
            for i in (0, 4):
                model.train_on_batch(x[i:i + 4], y[i:i + 4])
    assert len(traces) == 1


@pytest.mark.parametrize("how", ["run_eagerly", "run_functions_eagerly"])
def test_a_step_that_runs_eagerly_is_not_built_first(how, monkeypatch):
    # Nothing is traced there: the symbolic pass over the model would be paid for nothing.
    import numpy as np
    import tensorflow as tf

    from conftest import traced
    from tl_keras import devices

    built = []
    symbolic = keras.Model._symbolic_build
    monkeypatch.setattr(keras.Model, "_symbolic_build",
                        lambda self, *a, **k: built.append(1) or symbolic(self, *a, **k))
    model, x, y = _classifier(run_eagerly=how == "run_eagerly")
    pipeline = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    before = model.get_weights()
    with traced():
        tf.config.run_functions_eagerly(how == "run_functions_eagerly")
        history = devices.Devices(None).fit(model, pipeline, pipeline, epochs=2, verbose=0)
    assert built == []
    assert len(history.history["accuracy"]) == 2 and len(model.optimizer.variables) > 1
    assert not np.array_equal(model.get_weights()[0], before[0])
