"""Forward passes that train nothing, as one constant-folded TensorFlow graph.

A frozen backbone's weights never change during a pass, so its Keras model
can be traced once and its variables turned into constants (the first half
of `convert_variables_to_constants_v2`, the function TensorFlow's own
freezing uses; tf_internals.py). Grappler then folds what the constants
allow -- BatchNorm's scale and shift into the convolutions, the
preprocessing arithmetic -- and fuses the rest for oneDNN. On 2 CPU cores
EfficientNet-Lite0 at 96 px ran ~530-600 images/s this way against ~360-400
through Keras' `predict`, with outputs equal within float32 rounding
(largest difference 2.3e-5 on features up to ~6; docs/performance.md).

Used only where it is known to win: the TensorFlow backend with no GPU or TPU
visible and no distribution strategy (`usable`). Elsewhere -- GPUs, JAX,
tf.distribute -- `predict` runs Keras' `predict` as before, so those paths
are unchanged. `config.folded_inference=False` turns it off, and so does
`tf.config.run_functions_eagerly(True)` (debugging: a folded graph would run
none of the layers' Python).

Example:
    probabilities, labels = predict(model, pipeline)  # folded where usable()
    run = fold(features.extractor(model))  # folded once, for several passes
    pooled = run(images)  # numpy in, numpy out
"""

import warnings

import keras
import numpy as np

from tl_keras.arrays import as_labels


def usable():
    """Whether folded passes apply here: TensorFlow backend, CPU only, functions traced."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return not (tf.config.functions_run_eagerly() or tf.config.list_logical_devices("GPU")
                or tf.config.list_logical_devices("TPU"))


def fold(model):
    """`model` as a function of one batch of images (numpy or tensor, any dtype,
    cast to the model's input dtype) to numpy outputs, structured as `model.output`."""
    import tensorflow as tf

    from tl_keras import tf_internals

    spec = tf.TensorSpec(model.input.shape, model.input.dtype)

    @tf.function(autograph=False)
    def traced(x):  # outputs as a flat list: a frozen graph keeps no structure
        return tf.nest.flatten(model(x, training=False))

    traced = traced.get_concrete_function(spec)
    graph_def = tf_internals.frozen_graph_def(traced)
    feed, fetch = traced.inputs[0].name, [t.name for t in traced.outputs]

    def imported(x):
        return tf.graph_util.import_graph_def(graph_def, input_map={feed: x},
                                              return_elements=fetch, name="folded")

    frozen = tf.compat.v1.wrap_function(imported, [spec])

    def run(images):
        outputs = [t.numpy() for t in frozen(tf.cast(images, spec.dtype))]
        return tf.nest.pack_sequence_as(model.output, outputs)

    return run


def predict(model, source, batch_size=256, verbose=0, total=None, fold_it=None):
    """(outputs, labels or None) of `model` over `source`, in its order.

    Args:
      model: a Keras model, or `fold(model)` (folded once, for several passes).
      source: a batched tf.data pipeline of `(images, labels)` or of images
        alone (its own batches), or an `(x, y)` numpy tuple (in batches of
        `batch_size`).
      verbose: a progress bar towards `total` images.
      fold_it: None folds a Keras model where `usable()`; False runs Keras'
        `predict`, the labels passed through the model beside the images, so
        one pass keeps them in step.

    Returns:
      The outputs concatenated (an array, or a dict of them, as the model's
      outputs) and the labels, None for a pipeline of images alone.
    """
    if isinstance(model, keras.Model):
        if fold_it is False or (fold_it is None and not usable()):
            return _keras_predict(model, source, batch_size, verbose)
        model = fold(model)
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
        outputs.append(model(x))
        if y is not None:
            labels.append(as_labels(y))  # indices [B], or label vectors [B, classes]
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


def _keras_predict(model, source, batch_size, verbose):
    """`predict`'s Keras path (GPUs, JAX, tf.distribute, or `fold_it=False`)."""
    if isinstance(source, tuple):
        x, y = source
        return model.predict(x, batch_size=batch_size, verbose=verbose), np.asarray(y)
    with warnings.catch_warnings():  # a rebatched or cut pipeline's length is unknown
        warnings.filterwarnings("ignore", "Your input ran out of data")
        if not isinstance(source.element_spec, tuple):  # images alone
            return model.predict(source, verbose=verbose), None
        # A tf.data pipeline, used through its own API (no TensorFlow import here).
        label_spec = source.element_spec[1]
        images = keras.Input(model.input.shape[1:], dtype=model.input.dtype, name="images")
        labels = keras.Input(label_spec.shape[1:], dtype=label_spec.dtype.name, name="labels")
        paired = keras.Model([images, labels], {
            "outputs": model(images), "labels": keras.layers.Identity(name="labels_out")(labels)})
        out = paired.predict(source.map(lambda x, y: ((x, y),)), verbose=verbose)
    return out["outputs"], out["labels"]
