"""tf.data pipelines from an image folder, a TFDS dataset, a built-in dataset or numpy arrays.

Every source becomes `Examples`: unbatched `(uint8 image [H, W, C], int label)`
datasets for training and validation, plus class names and counts. `load`
then resizes, caches, shuffles, batches, augments (training side only) and
prefetches:

    source -> Examples -> resize (uint8) -> cache -> shuffle -> batch
           -> augment (train only) -> prefetch

Example:
    data = load(config)          # config.dataset: a folder, "tfds:NAME", "digits", ...
    model.fit(data.train, validation_data=data.val)
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import socket
import sys

import keras
import numpy as np
import tensorflow as tf

from tl_keras import run_folder
from tl_keras.arrays import BUILTIN, load_builtin, split_indices

AUTOTUNE = tf.data.AUTOTUNE
RAND_AUGMENT_STREAM = 7  # Augmentation: RandAugment's seed, folded from the batch's
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass
class Examples:
    """A source's examples before the pipeline: unbatched (uint8 image, label)."""
    train: tf.data.Dataset
    val: tf.data.Dataset
    class_names: list
    train_examples: int
    val_examples: int
    channels: int
    skipped: list = dataclasses.field(default_factory=list)  # unreadable files
    train_label_counts: object = None  # training images per class, when the source knows


@dataclasses.dataclass
class Datasets:
    """What `fit` needs: batched pipelines and what describes them."""
    train: tf.data.Dataset
    val: tf.data.Dataset
    class_names: list
    train_examples: int
    val_examples: int
    channels: int
    image_size: int
    skipped: list
    train_label_counts: object = None  # training images per class; None: count a pass
    augmented: bool = False  # the training pipeline gives new random views on every read
    drop_remainder: bool = False  # training batches are all full
    # The same pipelines built afresh: their first read is in the same seeded order
    # as this one's first read (a pipeline read again is reshuffled).
    fresh: object = None
    # A new training pipeline without shuffling or augmentation, in the source's
    # seeded random order (the regime advisor scores its first N images: advise.py).
    plain_train: object = None


def load(config, image_size, batch_size=None, drop_remainder=False):
    """Builds the training and validation pipelines that `config` names.

    Args:
      config: the run's ConfigDict (`dataset`, `batch_size`, `seed`,
        `val_fraction`, `max_examples`, `strict`, augmentation keys, ...).
      image_size: height and width the images are resized to.
      batch_size: examples per batch; default `config.batch_size`. Under a
        tf.distribute strategy, the global batch (distribute.global_batch).
      drop_remainder: training batches all full, the last smaller one dropped
        (every epoch reshuffles, so other images are left out each time).
        Under a strategy with 2+ replicas: a last batch of 1 would leave a
        replica an empty batch, whose loss is NaN.

    Returns:
      `Datasets`.
    """
    examples = load_examples(config)
    return make_datasets(examples, config, image_size, batch_size, drop_remainder)


def load_examples(config):
    """The `Examples` of `config.dataset`: a folder, `tfds:NAME` or a built-in name."""
    dataset = str(config.dataset)
    if dataset.startswith("tfds:"):
        examples = from_tfds(dataset[len("tfds:"):], config)
    elif dataset in BUILTIN:
        x, y, x_val, y_val, names = load_builtin(dataset)
        examples = from_arrays(x, y, class_names=names, x_val=x_val, y_val=y_val,
                               val_fraction=config.val_fraction, seed=config.seed,
                               max_examples=config.max_examples,
                               examples_per_class=config.examples_per_class)
    elif os.path.isdir(dataset):
        examples = from_folder(dataset, val_fraction=config.val_fraction,
                               seed=config.seed, max_examples=config.max_examples,
                               examples_per_class=config.examples_per_class,
                               strict=config.strict)
    else:
        raise ValueError(
            f"dataset {dataset!r} is not a folder, not tfds:NAME and not a "
            f"built-in dataset ({', '.join(BUILTIN)})")
    if examples.train_examples < 1 or examples.val_examples < 1:
        raise ValueError(
            f"dataset {dataset!r} has an empty split: {examples.train_examples} "
            f"training and {examples.val_examples} validation examples")
    return examples


# --- Sources -----------------------------------------------------------------

def from_folder(root, val_fraction=0.2, seed=0, max_examples=None, examples_per_class=None,
                strict=False):
    """Images in `root/<class name>/*` (JPEG, PNG, BMP, GIF, WebP), split by seed.

    Every file is decoded once up front with TensorFlow's own decoder, the
    one training will use: an undecodable, truncated or empty file is skipped
    and counted (or, with `strict`, raises naming it), never trained on.
    Anything else in a class folder (other extensions, nested folders) is
    not read, and counted and named too.
    """
    if not os.path.isdir(root):
        raise ValueError(f"dataset folder {root!r} does not exist")
    class_names = sorted(
        d for d in _listdir(root, "dataset folder")
        if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    unlisted = [d for d in class_names if not d.isprintable()]
    if unlisted:  # labels.txt holds one class per line: a name must be one printable line
        raise ValueError(f"class folder name {unlisted[0]!r} in {root!r} holds a line break "
                         "or another unprintable character; rename the folder")
    if len(class_names) < 2:
        raise ValueError(
            f"dataset folder {root!r} needs one subfolder per class and at least "
            f"2 classes; found {len(class_names)}: {class_names}")
    paths, labels, ignored = [], [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        entries = sorted(f for f in _listdir(folder, "class folder") if not f.startswith("."))
        files = [f for f in entries if f.lower().endswith(IMAGE_EXTENSIONS)
                 and os.path.isfile(os.path.join(folder, f))]
        ignored += [os.path.join(folder, f) for f in sorted(set(entries) - set(files))]
        if not files:
            raise ValueError(
                f"class folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += [os.path.join(folder, f) for f in files]
        labels += [label] * len(files)
    if ignored:
        print(listing(f"Not read: {len(ignored)} entries of class folders that are not "
                       f"{'/'.join(IMAGE_EXTENSIONS)} files (nested folders are not read either)",
                       [p + ("/" if os.path.isdir(p) else "") for p in ignored]), file=sys.stderr)

    bad = check_images(paths, CheckedFiles(root))
    if bad and strict:
        path, reason = bad[0]
        raise ValueError(f"cannot decode image {path!r}: {reason} ({len(bad)} bad files in all)")
    if bad:
        print(listing(f"Skipped {len(bad)} of {len(paths)} files that cannot be decoded "
                       "(--strict fails instead)", [f"{p}: {r}" for p, r in bad]),
              file=sys.stderr)
        bad_paths = {p for p, _ in bad}
        kept = [(p, l) for p, l in zip(paths, labels) if p not in bad_paths]
        paths, labels = [p for p, _ in kept], [l for _, l in kept]
        for label, name in enumerate(class_names):
            if label not in labels:
                raise ValueError(f"class folder {name!r} has no readable images left")

    train_idx, val_idx = split_indices(np.array(labels), val_fraction, seed, max_examples,
                                       examples_per_class)
    train_idx = _seeded_order(train_idx, seed)
    paths, labels = np.array(paths), np.array(labels, dtype="int32")

    def dataset(idx):
        ds = tf.data.Dataset.from_tensor_slices((paths[idx], labels[idx]))
        return ds.map(lambda p, y: (_decode(p), y), num_parallel_calls=AUTOTUNE)

    return Examples(dataset(train_idx), dataset(val_idx), class_names,
                    len(train_idx), len(val_idx), channels=3,
                    skipped=[p for p, _ in bad],
                    train_label_counts=np.bincount(labels[train_idx], minlength=len(class_names)))


def listing(title, lines, shown=5):
    """`title:` and the first `shown` lines, indented, then how many more."""
    more = [f"... and {len(lines) - shown} more"] if len(lines) > shown else []
    return "\n  ".join([title + ":", *lines[:shown], *more])


def _listdir(folder, what):
    """`os.listdir(folder)`; a folder that cannot be read is a one-line `ValueError`."""
    try:
        return os.listdir(folder)
    except OSError as e:
        raise ValueError(f"cannot read {what} {folder!r}: {e.strerror}") from None


def _decode(path):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                               expand_animations=False)  # a GIF's first frame
    image.set_shape([None, None, 3])
    return image


def _check_file(path):
    """Why TensorFlow cannot decode the file at `path`, or None when it can."""
    try:
        image = _decode(tf.constant(path))
        if image.shape[0] == 0 or image.shape[1] == 0:
            return "empty image"
    except (tf.errors.OpError, ValueError) as e:
        return _short_reason(e.message if hasattr(e, "message") else str(e))
    return None


def check_images(paths, manifest=None):
    """[(path, reason)] for each file TensorFlow cannot decode, in order.

    With a `CheckedFiles` manifest, a file it holds unchanged (same size and
    modification time) is not decoded again; the others are, and are recorded.
    """
    known = manifest.known(paths) if manifest is not None else {}
    todo = [p for p in paths if p not in known]
    progress = keras.utils.Progbar(len(todo), unit_name="file") if len(todo) > 2000 else None
    found = {}
    with _native_stderr_dropped(), \
            concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for i, (path, reason) in enumerate(zip(todo, pool.map(_check_file, todo))):
            found[path] = reason
            if progress and (i + 1) % 500 == 0:
                progress.update(i + 1)
    if progress:
        progress.update(len(todo), finalize=True)
    if manifest is not None and todo:
        manifest.save(found)
    reasons = {**known, **found}
    return [(p, reasons[p]) for p in paths if reasons[p]]


class CheckedFiles:
    """What decoding each file of an image folder found, kept between starts:
    relative path -> [size, mtime_ns, reason or None], in one JSON file per folder
    under `$TL_KERAS_CACHE` (default ~/.cache/tl_keras) `/checked/`, written whole.

    A second start on an unchanged folder decodes nothing to check it; a file
    whose size or modification time changed is decoded again. The dataset
    folder itself is never written to.
    """

    def __init__(self, root):
        self.root = os.path.realpath(root)
        cache = os.environ.get("TL_KERAS_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "tl_keras")
        digest = hashlib.sha1(self.root.encode()).hexdigest()[:16]
        self.path = os.path.join(cache, "checked", f"{digest}.json")
        self.entries, self.stats = {}, {}
        try:
            with open(self.path) as f:
                saved = json.load(f)
            if saved.get("root") == self.root:
                self.entries = saved["files"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # none yet, or unreadable: every file is checked

    def _key(self, path):
        return os.path.relpath(os.path.realpath(path), self.root)

    def known(self, paths):
        """{path: reason or None} of `paths` the manifest holds unchanged."""
        out = {}
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue  # checked (and reported) by decoding
            self.stats[path] = [st.st_size, st.st_mtime_ns]
            entry = self.entries.get(self._key(path))
            if entry is not None and entry[:2] == self.stats[path]:
                out[path] = entry[2]
        return out

    def save(self, found):
        """Records `found` {path: reason or None}; a cache that cannot be written is skipped."""
        for path, reason in found.items():
            if path in self.stats:
                self.entries[self._key(path)] = [*self.stats[path], reason]
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            run_folder.write_json(self.path, {"root": self.root, "files": self.entries},
                                  indent=None)
        except OSError as e:
            print(f"warning: cannot keep the checked-files manifest {self.path!r} "
                  f"({e.strerror}); the next start checks every file again", file=sys.stderr)


def _short_reason(message):
    """TensorFlow's decode error without its op names: "Input is empty."."""
    line = (message.strip().splitlines() or ["cannot be decoded"])[0]
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line)
    return re.sub(r"\s*\[Op:\w+\].*$", "", line) or "cannot be decoded"


@contextlib.contextmanager
def _native_stderr_dropped():
    """Drops what native code writes to file descriptor 2 meanwhile.

    libjpeg and TensorFlow's logging print a line of their own for each bad
    file ("Premature end of JPEG data"); `check_images` reports each bad file
    once, with its reason, instead.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:  # no file descriptor 2
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _seeded_order(indices, seed):
    """`indices` in a seeded random order. Sources list the training set in this
    order: the pipeline's shuffle buffer (10,000 at most) then mixes classes even
    when a folder lists a million images class by class, and the first N images
    are a seeded random sample (the regime advisor's, advise.py)."""
    return np.random.default_rng([seed, 1]).permutation(indices)


def from_arrays(x, y, class_names=None, x_val=None, y_val=None, val_fraction=0.2,
                seed=0, max_examples=None, examples_per_class=None):
    """Examples from numpy images `x` [N, H, W] or [N, H, W, C] (0-255) and labels `y`.

    Without `x_val`, a stratified `val_fraction` of `x` is held out by `seed`.

    Example:
      examples = from_arrays(images, labels, class_names=["cat", "dog"])
    """
    x, y = _as_images(x), np.asarray(y).astype("int32").reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    num_classes = int(y.max()) + 1 if len(y) else 0
    class_names = list(class_names) if class_names is not None else [
        str(i) for i in range(num_classes)]
    if len(class_names) < 2:
        raise ValueError(f"need at least 2 classes, got {len(class_names)}")
    if x_val is None:
        train_idx, val_idx = split_indices(y, val_fraction, seed, max_examples,
                                           examples_per_class)
        x, y, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    else:
        x_val, y_val = _as_images(x_val), np.asarray(y_val).astype("int32").reshape(-1)
        train_idx, _ = split_indices(y, 0.0, seed, max_examples, examples_per_class)
        x, y = x[train_idx], y[train_idx]
    order = _seeded_order(np.arange(len(y)), seed)
    x, y = x[order], y[order]
    return Examples(tf.data.Dataset.from_tensor_slices((x, y)),
                    tf.data.Dataset.from_tensor_slices((x_val, y_val)),
                    class_names, len(x), len(x_val), channels=x.shape[-1],
                    train_label_counts=np.bincount(y, minlength=len(class_names)))


def _as_images(x):
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {x.shape}")
    return np.clip(np.round(x), 0, 255).astype("uint8") if x.dtype != np.uint8 else x


def from_tfds(spec, config):
    """Examples of TFDS dataset `spec` ("NAME" or "NAME/CONFIG:VERSION").

    Splits: `config.train_split` (default "train"); `config.val_split`, else
    "validation", else "test", else the last `val_fraction` of the training
    split (TFDS slicing: by position, not by seed). Split strings take TFDS
    slicing, e.g. "train[:10%]".

    Without network, a dataset that is not prepared in the data directory
    fails at once instead of waiting out TFDS' download timeouts.
    """
    import tensorflow_datasets as tfds

    data_dir = config.tfds_data_dir or None
    try:
        builder = tfds.builder(spec, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
        raise ValueError(f"unknown TFDS dataset {spec!r}: {str(e).splitlines()[0]}") from e
    if not builder.is_prepared():
        if not network_available():
            raise ValueError(
                f"TFDS dataset {spec!r} is not prepared in {builder.data_dir} and there "
                "is no network to download it; prepare it where there is network "
                "(`tfds build`) and pass --config.tfds_data_dir")
        builder.download_and_prepare()

    info = builder.info
    splits = set(info.splits.keys()) if info.splits else set()
    train_split = config.train_split or "train"
    val_split = config.val_split or next(
        (s for s in ("validation", "test") if s in splits), None)
    if val_split is None:
        percent = max(1, round(100 * config.val_fraction))
        val_split = f"{train_split}[-{percent}%:]"
        train_split = f"{train_split}[:-{percent}%]"
    try:
        train, val = builder.as_dataset(split=[train_split, val_split], as_supervised=True,
                                        shuffle_files=False)
    except Exception as e:
        raise ValueError(f"TFDS dataset {spec!r}: cannot read splits "
                         f"{train_split!r}, {val_split!r}: {str(e).splitlines()[0]}") from e
    if config.examples_per_class:
        raise ValueError("examples_per_class is not supported for tfds: datasets; "
                         "use --max_examples or a train_split slice such as 'train[:2000]'")
    if config.max_examples:
        train = train.take(config.max_examples)
    label = info.features["label"] if "label" in info.features else None
    num_classes = label.num_classes if label is not None else 0
    class_names = list(label.names) if label is not None else []
    if num_classes < 2:
        raise ValueError(f"TFDS dataset {spec!r} has no class label with at least 2 classes")
    image_feature = info.features["image"]
    channels = image_feature.shape[-1] or 3

    def normalise(image, y):
        if image.shape.rank == 2:
            image = image[..., None]
        return tf.cast(image, tf.uint8), tf.cast(y, tf.int32)

    train, val = train.map(normalise, AUTOTUNE), val.map(normalise, AUTOTUNE)
    return Examples(train, val, class_names, _count(train), _count(val), channels)


def _count(ds):
    n = int(ds.cardinality())
    if n < 0:  # unknown: count once
        n = int(ds.reduce(0, lambda c, _: c + 1))
    return n


def network_available(host="storage.googleapis.com", port=443, timeout=3.0):
    """Whether a TCP connection to TFDS' storage opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- Pipeline ------------------------------------------------------------------

def make_datasets(examples, config, image_size, batch_size=None, drop_remainder=False):
    """Batched, cached, prefetched pipelines of `examples` at `image_size`."""
    size = (image_size, image_size)
    batch_size = int(batch_size or config.batch_size)
    if drop_remainder and examples.train_examples < batch_size:
        raise ValueError(f"{examples.train_examples} training images are fewer than one batch "
                         f"of {batch_size} (the global batch: per replica x replicas); "
                         "lower --batch_size")

    def resize_example(image, y):
        return tf.cast(resize(image, size), tf.uint8), y

    augment = augmentation(config)
    cache_limit = config.image_cache_bytes
    # TensorFlow combines an op's seed with the global seed, and uses a default one
    # when none is set: without this the shuffle order depended on whether anything
    # had set the global seed before (a tuner trial's data and a fresh process's
    # differed). `train.finetune` sets the same seed again before training.
    tf.random.set_seed(config.seed)

    def pipeline(ds, n, training, augment=augment, plain=False):
        ds = ds.map(resize_example, num_parallel_calls=AUTOTUNE)
        if plain:  # the training images in the source's seeded order, as they are
            return ds.batch(batch_size).prefetch(AUTOTUNE)
        if n * image_size * image_size * examples.channels <= cache_limit:
            ds = ds.cache()
        if training:
            ds = ds.shuffle(min(n, 10_000), seed=config.seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=training and drop_remainder)
        if training and augment is not None:
            ds = augment_batches(ds, augment, config.seed)
        return ds.prefetch(AUTOTUNE)

    return Datasets(
        train=pipeline(examples.train, examples.train_examples, True),
        val=pipeline(examples.val, examples.val_examples, False),
        class_names=list(examples.class_names),
        train_examples=examples.train_examples, val_examples=examples.val_examples,
        channels=examples.channels, image_size=image_size, skipped=examples.skipped,
        train_label_counts=examples.train_label_counts, augmented=augment is not None, drop_remainder=drop_remainder,
        fresh=lambda: make_datasets(examples, config, image_size, batch_size, drop_remainder),
        plain_train=lambda: pipeline(examples.train, examples.train_examples, True, plain=True))


def resize(image, size):
    """An image [H, W, C] (any real dtype) at `size` (height, width), float32 rounded
    to 0-255: how training, serving (export.decode_image) and prediction resize.

    Shrinking, an antialiasing filter; enlarging, bilinear interpolation, which
    is what the antialiased kernel computes there too (equal within float32
    rounding: 4.6e-5 at most on the 10,000 Fashion-MNIST test images at 28 -> 96 px)
    at ~0.4 of its cost (1.0 s against 2.6 s for those images on 2 cores).
    """
    shape = tf.shape(image)
    shrinks = tf.logical_or(shape[0] > size[0], shape[1] > size[1])
    image = tf.cond(shrinks, lambda: tf.image.resize(image, size, antialias=True),
                    lambda: tf.image.resize(image, size))
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Random flips, zooms, rotations (and RandAugment) of a batch, drawn from a seed alone.

    The same batch and seed give the same images, in any thread: the ops are
    stateless (`tf.image.stateless_random_*`, `tf.random.stateless_uniform`),
    unlike Keras' RandomFlip / RandomZoom / RandomRotation, whose shared
    SeedGenerator a parallel `map` draws from in a varying order (the same
    command then gave 0.818-0.827). `make_datasets` gives each batch its seed
    from a seeded stream that changes each epoch, so each epoch (and each cached
    view) is augmented anew, the same way in every run of the same config.

    As Keras' layers: a zoom factor z scales by 1 +- z (in or out), a rotation
    factor r turns by up to r of a full turn either way, both about the centre,
    bilinear, the edges reflected. Then, when given, Keras' RandAugment, its draws
    taken from the batch's seed too (keras_internals.seeded_rand_augment).
    """

    flip: str          # horizontal | vertical | horizontal_and_vertical | none
    zoom: float        # fraction of the size; 0: off
    rotation: float    # fraction of a full turn; 0: off
    rand_augment: object = None  # keras_internals.seeded_rand_augment(...), or None

    def __call__(self, images, seed):
        """`images` [B, H, W, C] (any real dtype) augmented, float32; `seed`: int64 [2]."""
        images = tf.cast(images, tf.float32)
        seeds = tf.random.experimental.stateless_split(seed, 4)
        if self.flip in ("horizontal", "horizontal_and_vertical"):
            images = tf.image.stateless_random_flip_left_right(images, seeds[0])
        if self.flip in ("vertical", "horizontal_and_vertical"):
            images = tf.image.stateless_random_flip_up_down(images, seeds[1])
        if self.zoom or self.rotation:
            images = self._zoom_and_rotate(images, seeds[2], seeds[3])
        if self.rand_augment is not None:  # its own seed: the streams above stay as they were
            images = self._rand_augment(images, tf.random.experimental.stateless_fold_in(
                seed, RAND_AUGMENT_STREAM))
        return images

    def _rand_augment(self, images, seed):
        """RandAugment of 0-255 images. Its colour ops need RGB: grey (with or without
        alpha) goes through as RGB and comes back grey; alpha is left as it was."""
        channels = images.shape[-1]
        if channels == 3:
            return self.rand_augment.augment(images, seed)
        if channels in (1, 2):
            grey = self.rand_augment.augment(tf.concat([images[..., :1]] * 3, -1), seed)
            return tf.concat([grey[..., :1], images[..., 1:]], -1)
        return tf.concat([self.rand_augment.augment(images[..., :3], seed), images[..., 3:]], -1)

    def _zoom_and_rotate(self, images, zoom_seed, angle_seed):
        batch = tf.shape(images)[0]
        scale = tf.random.stateless_uniform([batch], zoom_seed, 1 - self.zoom, 1 + self.zoom)
        turn = 2 * math.pi * self.rotation
        return zoom_and_rotate(images, scale,
                               tf.random.stateless_uniform([batch], angle_seed, -turn, turn))


def zoom_and_rotate(images, scale, angle):
    """`images` [B, H, W, C] float32, each scaled by `scale` [B] (> 1: zoomed out) and
    turned by `angle` [B] (radians) about its centre; bilinear, the edges reflected."""
    shape = tf.shape(images)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    # Output pixel (x, y) reads the input at centre + scale * R(angle) (xy - centre).
    cx, cy = (width - 1) / 2, (height - 1) / 2
    cos, sin = scale * tf.cos(angle), scale * tf.sin(angle)
    zeros = tf.zeros_like(cos)
    transforms = tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                           sin, cos, cy - sin * cx - cos * cy, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=shape[1:3],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")


def augmentation(config):
    """The training side's `Augmentation`, or None when it is off.

    `augment_flip`: "horizontal", "vertical", "horizontal_and_vertical" or "none";
    `augment_zoom`, `augment_rotation`: factors (fraction of size / of a full turn), 0 = off;
    `rand_augment`: RandAugment's ops per batch (Keras' layer, drawn from the batch's
    seed: keras_internals.seeded_rand_augment), 0 = off, at `rand_augment_magnitude`.
    """
    if not config.augment:
        return None
    flip = config.augment_flip or "none"
    if (flip == "none" and not config.augment_zoom and not config.augment_rotation
            and not config.rand_augment):
        return None
    rand_augment = None
    if config.rand_augment:
        from tl_keras import keras_internals

        rand_augment = keras_internals.seeded_rand_augment(
            value_range=(0, 255), num_ops=int(config.rand_augment),
            factor=float(config.rand_augment_magnitude), seed=int(config.seed))
    return Augmentation(flip, float(config.augment_zoom), float(config.augment_rotation),
                        rand_augment)


def augment_batches(ds, augment, seed):
    """`ds` of (images, labels) batches augmented in parallel, each batch by its own
    seed: (`seed`, a draw of a stream seeded by `seed` that is drawn anew each time
    `ds` is read), so the same in every run and different in each epoch."""
    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip(ds, draws)
    return ds.map(lambda batch, draw: (augment(batch[0], tf.stack([tf.constant(seed, tf.int64),
                                                                   draw])), batch[1]),
                  num_parallel_calls=AUTOTUNE, deterministic=True)


@dataclasses.dataclass(frozen=True)
class Mix:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with itself
    shuffled, the labels mixed in the same proportion: one lambda per batch from
    Beta(alpha, alpha), drawn from a seed alone (stateless ops, as `Augmentation`).
    CutMix pastes a box covering 1 - lambda of the image from the shuffled batch,
    and mixes the labels by the box's area as cut (clipped at the edges)."""

    kind: str       # mixup | cutmix
    alpha: float    # Beta(alpha, alpha)
    num_classes: int

    def __call__(self, images, labels, seed):
        """(images float32, labels [B, num_classes] float32) mixed; `seed`: int64 [2]."""
        images = tf.cast(images, tf.float32)
        labels = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), self.num_classes)
        seeds = tf.random.experimental.stateless_split(seed, 4)
        size = tf.shape(images)[0]
        order = tf.argsort(tf.random.stateless_uniform([size], seeds[0]))
        a = tf.random.stateless_gamma([], seeds[1], alpha=self.alpha)
        b = tf.random.stateless_gamma([], seeds[2], alpha=self.alpha)
        lam = a / (a + b)
        if self.kind == "mixup":
            images = lam * images + (1 - lam) * tf.gather(images, order)
        else:
            inside, lam = _box(tf.shape(images)[1], tf.shape(images)[2], 1 - lam, seeds[3])
            images = tf.where(inside[None, :, :, None], tf.gather(images, order), images)
        return images, lam * labels + (1 - lam) * tf.gather(labels, order)


def _box(height, width, area, seed):
    """A [height, width] mask of a box covering `area` of the image at a random centre
    (clipped at the edges), and 1 - the area it covers after clipping."""
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    cy, cx = tf.unstack(tf.random.stateless_uniform([2], seed) * tf.stack([h, w]))
    half_h, half_w = h * tf.sqrt(area) / 2, w * tf.sqrt(area) / 2
    rows = tf.range(h)[:, None] + 0.5
    cols = tf.range(w)[None, :] + 0.5
    inside = ((rows >= cy - half_h) & (rows < cy + half_h)
              & (cols >= cx - half_w) & (cols < cx + half_w))
    return inside, 1 - tf.reduce_mean(tf.cast(inside, tf.float32))


def mix_batches(ds, mix, seed):
    """`ds` of (images, labels) batches mixed by `mix` (a `Mix`), each batch by its own
    seed drawn as `augment_batches` draws them (another stream: `seed` + 1)."""
    draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip(ds, draws)
    return ds.map(lambda batch, draw: mix(batch[0], batch[1], tf.stack(
        [tf.constant(seed, tf.int64), draw])), num_parallel_calls=AUTOTUNE, deterministic=True)
