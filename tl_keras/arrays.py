"""Datasets as numpy arrays, without TensorFlow: the built-in datasets and the seeded split.

`data.py` builds its tf.data pipelines on these; code that must run where
TensorFlow is not installed (the benchmark with `KERAS_BACKEND=jax`) uses
them directly.

Example:
    x, y, x_val, y_val, class_names = load_builtin("fashion_mnist")
    train, val = split_indices(y, 0.2, seed=0, examples_per_class=200)
"""

import gzip
import os

import keras
import numpy as np

BUILTIN = ("digits", "fashion_mnist")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def load_builtin(name):
    """(x, y, x_val, y_val, class_names) of a built-in dataset; x_val may be None."""
    if name == "digits":
        from sklearn.datasets import load_digits  # ships with scikit-learn, offline
        digits = load_digits()
        x = np.round(digits.images * (255.0 / 16.0)).astype("uint8")
        return x, digits.target, None, None, [str(i) for i in range(10)]
    if name == "fashion_mnist":
        if os.path.isdir(FASHION_MNIST_DIR):
            def idx(stem):
                with gzip.open(os.path.join(FASHION_MNIST_DIR, stem + ".gz")) as f:
                    data = f.read()
                # IDX: magic (2 zero bytes, dtype, ndim), ndim big-endian sizes, data.
                ndim = data[3]
                shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
                return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
            x, y = idx("train-images-idx3-ubyte"), idx("train-labels-idx1-ubyte")
            x_val, y_val = idx("t10k-images-idx3-ubyte"), idx("t10k-labels-idx1-ubyte")
        else:
            try:  # downloads: needs network
                (x, y), (x_val, y_val) = keras.datasets.fashion_mnist.load_data()
            except Exception as e:  # keras.utils.get_file raises a bare Exception
                raise ValueError(
                    f"fashion_mnist: {FASHION_MNIST_DIR} is missing and the download failed "
                    f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); "
                    "install the Debian package (apt-get install dataset-fashion-mnist), "
                    "or use --dataset=digits") from e
        return x, y, x_val, y_val, FASHION_MNIST_CLASSES
    raise ValueError(f"unknown built-in dataset {name!r}; valid: {', '.join(BUILTIN)}")


def as_labels(labels):
    """Labels as a source gives them to the pipeline: class indices, int32 [N]; or 0/1
    vectors over the classes (several labels per image), float32 [N, classes]."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        return labels.astype("float32")
    return labels.astype("int32").reshape(-1)


def label_counts(labels, num_classes):
    """Images per class: of class indices, or (label vectors) images holding each label."""
    if labels.ndim == 2:
        return (labels > 0).sum(axis=0).astype("int64")
    return np.bincount(labels, minlength=num_classes)


def strata(labels):
    """What the seeded split stratifies on: the class; with label vectors, each image's
    rarest label (none: a stratum of its own), so every label reaches validation."""
    if labels.ndim == 1:
        return labels
    counts = (labels > 0).sum(axis=0)
    rarity = np.where(labels > 0, counts, np.iinfo("int64").max)
    return np.where((labels > 0).any(axis=1), rarity.argmin(axis=1), labels.shape[1])


def split_indices(labels, val_fraction, seed, max_examples=None, examples_per_class=None):
    """Stratified seeded split: (train indices, val indices), each sorted.

    Each class with at least 2 examples gives round(val_fraction * n) of
    them (at least 1) to validation. Then `examples_per_class` caps each
    class's training indices and `max_examples` the total, both with seeded
    random subsets. Validation is never capped.

    Example:
      train, val = split_indices(labels, 0.2, seed=0, examples_per_class=200)
    """
    classes = np.unique(labels)
    if max_examples and max_examples < len(classes):
        raise ValueError(f"max_examples={max_examples} cannot give each of the {len(classes)} "
                         f"classes a training image: give at least {len(classes)}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = 0
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        val.append(idx[:n_val])
        train.append(idx[n_val:][:examples_per_class or None])
    train, val = np.concatenate(train), np.concatenate(val)
    if max_examples and len(train) > max_examples:
        train = rng.choice(train, max_examples, replace=False)
    return np.sort(train), np.sort(val)
