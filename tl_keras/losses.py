"""The training loss: sparse categorical cross-entropy, optionally against smoothed labels
or mixed ones (mixup, CutMix), and the accuracy that reads them; multi-label's binary
cross-entropy with a weight per label's positives.

Example:
    model.compile(loss=crossentropy(config.label_smoothing), ...)
"""

import keras


def checked_smoothing(label_smoothing):
    """`label_smoothing` as a float; a one-line `ValueError` outside [0, 1)."""
    smoothing = float(label_smoothing)
    if not 0 <= smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {smoothing}")
    return smoothing


def crossentropy(label_smoothing=0.0, soft=False):
    """Sparse categorical cross-entropy, against labels smoothed by `label_smoothing`;
    `soft`: one that also takes mixed labels (mixup, CutMix: [N, classes])."""
    smoothing = checked_smoothing(label_smoothing)
    if smoothing == 0 and not soft:
        return "sparse_categorical_crossentropy"  # stock Keras: model.keras loads anywhere
    return SmoothedSparseCrossentropy(smoothing)


def _as_probabilities(y_true, y_pred):
    """Integer labels ([N] or [N, 1]) one-hot; labels that are already a distribution
    over the classes ([N, classes], mixed) as they are."""
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == y_pred.shape[-1] != 1:
        return keras.ops.cast(y_true, y_pred.dtype)
    labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
    return keras.ops.one_hot(labels, keras.ops.shape(y_pred)[-1], dtype=y_pred.dtype)


@keras.saving.register_keras_serializable(package="tl_keras")
def accuracy(y_true, y_pred):
    """Accuracy against integer labels, or against the largest share of mixed ones."""
    target = keras.ops.argmax(_as_probabilities(y_true, y_pred), axis=-1)
    return keras.ops.cast(keras.ops.equal(target, keras.ops.argmax(y_pred, axis=-1)), "float32")


def metrics(soft=False):
    """What `compile` takes as metrics: "accuracy", or with mixed labels one that reads
    both them (training) and integer labels (validation), under the same name."""
    return [keras.metrics.MeanMetricWrapper(accuracy, name="accuracy")] if soft else ["accuracy"]


@keras.saving.register_keras_serializable(package="tl_keras")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of integer labels, one-hot encoded and smoothed (or of mixed labels,
    [N, classes], as they are).

    Keras' `SparseCategoricalCrossentropy` has no `label_smoothing`. A model
    compiled with this loss loads after `import tl_keras.losses`, or with
    `compile=False`.
    """

    def __init__(self, label_smoothing, name="smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        return keras.losses.categorical_crossentropy(
            _as_probabilities(y_true, y_pred), y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="tl_keras")
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy per label, each label's positive term weighted by its
    `positive_weights` entry (multi-label's class_weight=balanced: negatives over
    positives, as `pos_weight` in the field), the labels smoothed towards 0.5 as
    Keras' `BinaryCrossentropy(label_smoothing=...)` smooths them; mean over labels."""

    def __init__(self, positive_weights, label_smoothing=0.0, name="weighted_binary_crossentropy",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.positive_weights = [float(w) for w in positive_weights]
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        y_true = y_true * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        epsilon = keras.config.epsilon()
        p = keras.ops.clip(y_pred, epsilon, 1 - epsilon)
        weights = keras.ops.convert_to_tensor(self.positive_weights, dtype=y_pred.dtype)
        return -keras.ops.mean(weights * y_true * keras.ops.log(p)
                               + (1 - y_true) * keras.ops.log(1 - p), axis=-1)

    def get_config(self):
        return {**super().get_config(), "positive_weights": self.positive_weights,
                "label_smoothing": self.label_smoothing}
