"""The training loss: sparse categorical cross-entropy, optionally against smoothed labels.

Example:
    model.compile(loss=for_config(config), ...)
"""

import keras


def for_config(config):
    """Sparse categorical cross-entropy, against labels smoothed by `config.label_smoothing`."""
    smoothing = float(config.label_smoothing)
    if not 0 <= smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {smoothing}")
    if smoothing == 0:
        return "sparse_categorical_crossentropy"  # stock Keras: model.keras loads anywhere
    return SmoothedSparseCrossentropy(smoothing)


@keras.saving.register_keras_serializable(package="tl_keras")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of integer labels, one-hot encoded and smoothed.

    Keras' `SparseCategoricalCrossentropy` has no `label_smoothing`. A model
    compiled with this loss loads after `import tl_keras.losses`, or with
    `compile=False`.
    """

    def __init__(self, label_smoothing, name="smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        one_hot = keras.ops.one_hot(labels, keras.ops.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
