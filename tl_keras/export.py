"""Export: a trained classifier as a SavedModel that TF Serving loads as it is.

The layout TF Serving watches (`--model_base_path=DIR`): one folder per
integer version, the highest one served.

    DIR/
      1/                  saved_model.pb, variables/, assets/, fingerprint.pb,
                          assets.extra/labels.txt (one class name per line, for
                          tools/predict.py --saved_model; TF Serving ignores it)
      2/                  the next export; an existing version is never touched
      .tmp-3-XXXX/        only while version 3 is being written: it is renamed
                          to 3/ when complete, so TF Serving never sees half a model

Signatures (both with the `tensorflow/serving/predict` method name):

    serving_default   images       float32 [N, H, W, 3], pixel values 0-255, at
                                   the model's own H x W (another size: an error)
    serve_bytes       image_bytes  string [N], encoded JPEG / PNG / GIF / BMP
                                   of any size: decoded, converted to RGB and
                                   resized inside the graph the way training resized

    outputs           probabilities  float32 [N, C]
                      class_id       int64 [N], the top-1 class
                      class_name     string [N], its name

The SavedModel needs neither tl_keras nor Keras to load: the class names are
constants in the graph, the decoding and resizing are TensorFlow ops.

Example:
    version_dir = export_run("runs/small_similar_...", "exports/fashion")
"""

import contextlib
import json
import os
import shutil
import tempfile

import keras

from tl_keras import model as model_lib


LABELS = "labels.txt"  # in <version>/assets.extra/: the class names, one per line
THRESHOLDS = "thresholds.txt"  # beside it, a multi-label export's: one per class, same order


class ExportError(ValueError):
    """The export directory cannot be written, or the run cannot be exported."""


def export_run(workdir, export_dir, verbose=True):
    """Exports a finished run's `model.keras` as the next version under `export_dir`.

    Returns:
      The version's directory, e.g. "DIR/3".
    """
    metrics_path = os.path.join(workdir, "metrics.json")
    model_path = os.path.join(workdir, "model.keras")
    if not os.path.exists(metrics_path) or not os.path.exists(model_path):
        raise ExportError(
            f"workdir {workdir!r} holds no finished run (model.keras and metrics.json); "
            "finish the run first, or pass the run folder tools/finetune.py printed")
    from tl_keras import evaluate

    with open(metrics_path) as f:
        metrics = json.load(f)
    class_names = metrics["class_names"]
    check_export_dir(export_dir)
    model = model_lib.load_model(model_path)
    return export(model, class_names, export_dir, verbose=verbose,
                  thresholds=evaluate.run_thresholds(workdir, metrics))


def check_export_dir(export_dir):
    """Creates `export_dir` if needed and checks that a version can be written into it.

    Raises `ExportError` with one line naming the directory and the reason.
    """
    try:
        os.makedirs(export_dir, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".tmp-check-", dir=export_dir))
    except OSError as e:
        raise ExportError(
            f"cannot write to export_dir {export_dir!r}: {e.strerror or e}") from None


def export(model, class_names, export_dir, verbose=True, thresholds=None):
    """Writes `model` as the next free version `export_dir/<n>/`; returns that directory.

    Args:
      model: a classifier from raw pixels [N, H, W, C] (0-255, C in 1-4) to
        class probabilities, e.g. from `model.build_classifier`.
      class_names: one name per output class.
      export_dir: the model's base directory for TF Serving.
      verbose: print what was written.
      thresholds: a multi-label model's, one per class: its outputs are then the
        probabilities and `present` (each class at or above its threshold), and the
        thresholds go beside labels.txt (thresholds.txt).
    """
    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            "exporting a SavedModel needs the TensorFlow backend (KERAS_BACKEND=tensorflow); "
            f"this process runs {keras.backend.backend()!r}")
    class_names = [str(c) for c in class_names]
    num_classes = model.output.shape[-1]
    if len(class_names) != num_classes:
        raise ExportError(f"the model has {num_classes} outputs but {len(class_names)} "
                          "class names were given")
    check_export_dir(export_dir)
    if verbose:
        print(f"Exporting a SavedModel into {export_dir} ...")
    archive = serving_archive(model, class_names, thresholds)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=export_dir)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would lock out a server running as another user
    try:
        with quiet_tensorflow_logs():  # INFO lines per renamed signature input, per shard
            archive.write_out(tmp)
        write_labels(os.path.join(tmp, "assets.extra"), class_names, thresholds)
        version_dir = publish(tmp, export_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless writing failed
    if verbose:
        height, width = model.input.shape[1:3]
        print(f"Exported version {os.path.basename(version_dir)} to {version_dir}\n"
              f"  serving_default: images float32 [N, {height}, {width}, 3] (0-255)\n"
              f"  serve_bytes: image_bytes string [N] (JPEG, PNG, GIF, BMP; any size)\n"
              f"  outputs: probabilities [N, {num_classes}], "
              + (f"present [N, {num_classes}] (bool, at assets.extra/{THRESHOLDS})"
                 if thresholds is not None else "class_id [N], class_name [N]"))
    return version_dir


def write_labels(folder, class_names, thresholds=None):
    """`folder/labels.txt`: one class name per line, in output order; with `thresholds`
    (multi-label), `folder/thresholds.txt`: one threshold per line, in the same order."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LABELS), "w") as f:
        f.write("".join(f"{name}\n" for name in class_names))
    if thresholds is not None:
        with open(os.path.join(folder, THRESHOLDS), "w") as f:
            f.write("".join(f"{float(t)!r}\n" for t in thresholds))


def read_thresholds(version_dir):
    """A multi-label export's thresholds (assets.extra/thresholds.txt), else None."""
    path = os.path.join(version_dir, "assets.extra", THRESHOLDS)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return [float(line) for line in f if line.strip()]


def serving_archive(model, class_names, thresholds=None):
    """A `ServingArchive` of `model` with the `serving_default` and `serve_bytes` endpoints
    (`thresholds`: a multi-label model's, `export`)."""
    import tensorflow as tf

    height, width, channels = model.input.shape[1:4]
    names = tf.constant(class_names)

    def classify(images):
        probabilities = tf.cast(model(to_model_channels(images, channels), training=False),
                                tf.float32)
        if thresholds is not None:  # several labels per image: each decided on its own
            return {"probabilities": probabilities,
                    "present": probabilities >= tf.constant(thresholds, tf.float32)}
        class_id = tf.argmax(probabilities, axis=-1)
        return {"probabilities": probabilities, "class_id": class_id,
                "class_name": tf.gather(names, class_id)}

    def serving_default(images):
        # The graph would take any size (the backbone pools it away) and answer
        # for an image the model was not trained to see.
        check = tf.debugging.assert_equal(
            tf.shape(images)[1:3], tf.constant([height, width]),
            message=f"serving_default takes images of {height}x{width} pixels; resize them "
                    "first, or send encoded images to serve_bytes")
        with tf.control_dependencies([check]):
            return classify(tf.identity(images))

    def serve_bytes(image_bytes):
        images = tf.map_fn(lambda b: decode_image(b, height, width), image_bytes,
                           fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32))
        return classify(images)

    return ServingArchive(model, {
        "serving_default": (serving_default,
                            tf.TensorSpec([None, height, width, 3], tf.float32, name="images")),
        "serve_bytes": (serve_bytes, tf.TensorSpec([None], tf.string, name="image_bytes"))})


class ServingArchive:
    """A model's variables and its endpoints, written as a SavedModel by
    `tf.saved_model.save`: each endpoint a signature, and a function of the loaded object.

    (Keras' `keras.export.ExportArchive` writes the same signatures, but traces every
    endpoint twice, once outside the save, walks every layer for lookup tables, which a
    classifier has none of, and stores every variable twice: its exports took 2.5 times
    as long and twice the space, benchmarks/export_time.py, docs/serving.md.)
    """

    def __init__(self, model, endpoints):
        import tensorflow as tf

        self.module = tf.Module()
        # The variables the endpoints read, as TensorFlow's (Keras' hold one each).
        self.module.model_variables = [v.value for v in model.variables]
        self.signatures = {}
        for name, (fn, spec) in endpoints.items():
            function = tf.function(fn, input_signature=[spec], autograph=False)
            setattr(self.module, name, function)
            self.signatures[name] = function

    def write_out(self, path):
        import tensorflow as tf

        tf.saved_model.save(self.module, path, signatures=self.signatures)


def decode_image(image_bytes, height, width):
    """Encoded image -> float32 RGB [height, width, 3], 0-255, as training resizes.

    Decoded to RGB, resized as `data.resize` resizes (antialiased when it
    shrinks), rounded to whole pixel values (training caches resized images as uint8).
    """
    import tensorflow as tf

    from tl_keras import data

    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return data.resize(image, (height, width))


# Luma weights of ITU-R BT.601, as TensorFlow's and libjpeg's RGB -> grey.
_GREY = (0.299, 0.587, 0.114)


def to_model_channels(images, channels):
    """RGB images [N, H, W, 3] -> the `channels` the model was trained on (1-4)."""
    import tensorflow as tf

    if channels == 3:
        return images
    grey = tf.reduce_sum(images * tf.constant(_GREY, images.dtype), axis=-1, keepdims=True)
    opaque = tf.fill(tf.shape(grey), tf.constant(255.0, images.dtype))
    return {1: lambda: grey,
            2: lambda: tf.concat([grey, opaque], -1),
            4: lambda: tf.concat([images, opaque], -1)}[channels]()


@contextlib.contextmanager
def quiet_tensorflow_logs():
    """TensorFlow's INFO logs (absl's) off inside the block: SavedModel writes log a line
    per renamed signature input and per shard."""
    from absl import logging as absl_logging  # TensorFlow's SavedModel code logs through it

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def next_version(export_dir):
    """1 + the highest integer version under `export_dir` (1 when there is none)."""
    versions = [int(d) for d in os.listdir(export_dir) if d.isdigit()]
    return max(versions, default=0) + 1


def publish(tmp, export_dir, attempts=10):
    """Renames the finished folder `tmp` to the next free version under `export_dir`;
    returns the version folder."""
    # rename() is atomic; it fails rather than replace a version another
    # export published in the meantime, and then the next number is tried.
    for _ in range(attempts):
        version_dir = os.path.join(export_dir, str(next_version(export_dir)))
        try:
            os.rename(tmp, version_dir)
            return version_dir
        except OSError:
            if not os.path.exists(version_dir):
                raise
    raise ExportError(f"could not claim a new version under {export_dir!r} "
                      f"after {attempts} attempts")
