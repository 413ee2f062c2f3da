"""Forward passes that train nothing, as one constant-folded TensorFlow graph.

A frozen backbone's weights never change during a pass, so its Keras model
can be traced once and its variables turned into constants
(`convert_variables_to_constants_v2`, the function TensorFlow's own
freezing uses). Grappler then folds what the constants allow -- BatchNorm's
scale and shift into the convolutions, the preprocessing arithmetic -- and
fuses the rest for oneDNN. On 2 CPU cores EfficientNet-Lite0 at 96 px ran
~530-600 images/s this way against ~360-400 through Keras' `predict`, with
outputs equal within float32 rounding (largest difference 2.3e-5 on features
up to ~6; docs/performance.md).

Used only where it is known to win: the TensorFlow backend with no GPU or TPU
visible and no distribution strategy (`usable`). Elsewhere -- GPUs, JAX,
tf.distribute -- passes go through Keras' `predict` as before, so those paths
are unchanged. `config.folded_inference=False` turns it off.

Example:
    run = fold(features.extractor(model))
    pooled = run(images)  # numpy in, numpy out
    pooled, labels = predict(run, pipeline)  # a whole tf.data pipeline
"""

import keras
import numpy as np


def usable():
    """Whether folded passes apply here: TensorFlow backend, CPU only."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return not tf.config.list_logical_devices("GPU") and not tf.config.list_logical_devices("TPU")


def fold(model):
    """`model` as a function of one batch of images (numpy or tensor, any dtype,
    cast to the model's input dtype) to numpy outputs, structured as `model.output`."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2)

    dtype = model.input.dtype
    @tf.function(autograph=False)
    def traced(x):  # outputs as a flat list: a frozen function keeps no structure
        return tf.nest.flatten(model(x, training=False))

    frozen = convert_variables_to_constants_v2(
        traced.get_concrete_function(tf.TensorSpec(model.input.shape, dtype)))

    def run(images):
        outputs = [t.numpy() for t in frozen(tf.cast(images, dtype))]
        return tf.nest.pack_sequence_as(model.output, outputs)

    return run


def predict(run, source, batch_size=256, verbose=0, total=None):
    """(outputs, labels) of `run` (a model, or `fold(model)` to fold it once for
    several passes) over `source`: a batched tf.data pipeline of `(images, labels)`
    (its own batches), or an `(x, y)` numpy tuple (in batches of `batch_size`);
    outputs concatenated in order (an array, or a dict of them, as the model's
    outputs). `verbose`: a progress bar towards `total` images."""
    if isinstance(run, keras.Model):
        run = fold(run)
    if isinstance(source, tuple):
        images, labels = source
        batches = [(images[i:i + batch_size], labels[i:i + batch_size])
                   for i in range(0, len(labels), batch_size)]
        total = len(labels)
    else:
        batches = source.as_numpy_iterator()
    progress = keras.utils.Progbar(total, unit_name="image") if verbose else None
    outputs, labels, seen = [], [], 0
    for batch in batches:
        x, y = batch if isinstance(batch, tuple) else (batch, None)  # images alone: no labels
        outputs.append(run(x))
        if y is not None:
            labels.append(np.asarray(y).reshape(-1))
        seen += len(x)
        if progress:
            progress.update(seen)
    if not outputs:
        raise ValueError("the pipeline gave no images")
    if isinstance(outputs[0], dict):
        joined = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    else:
        joined = np.concatenate(outputs)
    return joined, np.concatenate(labels) if labels else None
