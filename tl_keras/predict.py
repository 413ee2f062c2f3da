"""Classify image files with a finished run or an exported SavedModel: top-k classes as CSV.

    files and folders --(every image file, folders walked, sorted)--> decode check
      (an undecodable file is skipped and counted, or with strict an error)
      --> batches decoded and resized as training resized them --> the model
      --> rows: path, class_1, probability_1, ..., class_k, probability_k

A run folder's `model.keras` takes the images through the same TensorFlow
decode and resize as `data.py` (`data.resize`; RGB converted to the model's
channels as export.py does); a SavedModel (`tools/export.py`) takes the file
bytes through its own `serve_bytes` signature, which decodes and resizes
inside the graph, and names classes from its `assets.extra/labels.txt`.

Example:
    predictor = from_run("runs/small_similar_...")
    rows, skipped = predict_files(predictor, ["photo.jpg", "folder/"], top_k=3)
"""

import csv
import dataclasses
import os
import sys

import numpy as np

from tl_keras import export, features, folded, image_files, tasks

BATCH = features.INFERENCE_BATCH  # images per forward pass


@dataclasses.dataclass
class Predictor:
    class_names: list
    probabilities: object   # callable: [paths] -> [N, C] float array
    source: str
    task: tasks.Task = tasks.SINGLE_LABEL  # how a row of probabilities is decoded
    thresholds: object = None  # multi_label: one per class (RUN/eval/thresholds.json)


def from_run(workdir, which="model"):
    """A `Predictor` of a finished run's model.keras (or best.keras); a multi-label run's
    with the thresholds tools/evaluate.py chose, if it has."""
    import tensorflow as tf

    from tl_keras import evaluate

    model, _, metrics = evaluate.load_run(workdir, which)
    height, width, channels = model.input.shape[1:4]

    def load(path):  # decoded and resized as training resized (export.decode_image)
        image = export.decode_image(tf.io.read_file(path), height, width)
        return export.to_model_channels(image[None], channels)[0]

    def probabilities(paths):
        images = tf.data.Dataset.from_tensor_slices(list(paths)).map(
            load, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(tf.data.AUTOTUNE)
        # On a CPU through the constant-folded graph (folded.py), else `predict`.
        return np.asarray(folded.predict(model, images)[0], "float64")

    return Predictor(metrics["class_names"], probabilities, os.path.join(workdir, f"{which}.keras"),
                     tasks.of_run(metrics), evaluate.run_thresholds(workdir, metrics))


def from_saved_model(directory):
    """A `Predictor` of a SavedModel export: a version folder, or the base folder
    (its highest version, as TF Serving serves)."""
    import tensorflow as tf

    if not os.path.isdir(directory):
        raise ValueError(f"saved_model {directory!r} is not a folder")
    versions = [d for d in os.listdir(directory) if d.isdigit()]
    if not os.path.exists(os.path.join(directory, "saved_model.pb")) and versions:
        directory = os.path.join(directory, max(versions, key=int))
    if not os.path.exists(os.path.join(directory, "saved_model.pb")):
        raise ValueError(f"{directory!r} holds no SavedModel (saved_model.pb); pass an "
                         "export folder tools/export.py wrote")
    labels = os.path.join(directory, "assets.extra", export.LABELS)
    if not os.path.exists(labels):
        raise ValueError(f"{directory!r} has no assets.extra/{export.LABELS} (an export of an "
                         "older tl_keras); export the run again with tools/export.py")
    with open(labels) as f:
        class_names = [line.rstrip("\n") for line in f]
    thresholds = export.read_thresholds(directory)  # a multi-label export's
    serve = tf.saved_model.load(directory).signatures.get("serve_bytes")
    if serve is None:
        raise ValueError(f"{directory!r} has no serve_bytes signature; export it with "
                         "tools/export.py")

    def probabilities(paths):
        out = []
        for i in range(0, len(paths), BATCH):
            blobs = [tf.io.read_file(p) for p in paths[i:i + BATCH]]
            out.append(serve(image_bytes=tf.stack(blobs))["probabilities"].numpy())
        return np.concatenate(out).astype("float64")

    task = tasks.SINGLE_LABEL if thresholds is None else tasks.MULTI_LABEL
    return Predictor(class_names, probabilities, directory, task, thresholds)


def find_images(inputs):
    """Image files named in `inputs` or found in the folders named there (walked,
    sorted); a name that does not exist raises `ValueError`."""
    paths = []
    for name in inputs:
        if os.path.isdir(name):
            for root, dirs, files in os.walk(name):
                dirs.sort()
                paths += [os.path.join(root, f) for f in sorted(files)
                          if f.lower().endswith(image_files.IMAGE_EXTENSIONS) and not f.startswith(".")]
        elif os.path.isfile(name):
            paths.append(name)
        else:
            raise ValueError(f"{name!r} is neither a file nor a folder")
    if not paths:
        raise ValueError(f"no image files ({', '.join(image_files.IMAGE_EXTENSIONS)}) in "
                         f"{', '.join(map(repr, inputs))}")
    return paths


def predict_files(predictor, inputs, top_k=5, strict=False):
    """(rows, skipped): a row per decodable image -- path, then its top-k (class,
    probability) pairs -- and [(path, reason)] of the files that could not be decoded."""
    paths = find_images(inputs)
    skipped = image_files.check_images(paths)
    if skipped and strict:
        path, reason = skipped[0]
        raise ValueError(f"cannot decode image {path!r}: {reason} "
                         f"({len(skipped)} undecodable files in all)")
    bad = {p for p, _ in skipped}
    good = [p for p in paths if p not in bad]
    if not good:
        raise ValueError(f"none of the {len(paths)} files could be decoded")
    decoded = predictor.task.decode(predictor.probabilities(good), predictor.class_names, top_k,
                                    thresholds=predictor.thresholds)
    rows = [[path] + [value for pair in pairs for value in pair]
            for path, pairs in zip(good, decoded)]
    return rows, skipped


def write_csv(rows, top_k, stream):
    """`rows` as CSV with a header: path, class_1, probability_1, ..."""
    k = max(((len(row) - 1) // 2 for row in rows), default=top_k)  # multi-label: varies
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["path"] + [f"{kind}_{i}" for i in range(1, k + 1)
                                for kind in ("class", "probability")])
    for row in rows:
        writer.writerow([row[0]] + [f"{v:.6f}" if isinstance(v, float) else v
                                    for v in row[1:]])


def report_skipped(skipped, total, stream=None, shown=5):
    """Names the files that could not be decoded, on `stream` (default: sys.stderr as it is
    when called, not as it was at import: a caller may have redirected it since)."""
    if skipped:
        print(image_files.listing(f"Skipped {len(skipped)} of {total} files that cannot be decoded "
                            "(--strict fails instead)", [f"{p}: {r}" for p, r in skipped],
                            shown), file=stream or sys.stderr)
