"""Cached backbone features: train the head of a frozen backbone without re-running it.

When everything below the head is frozen (the small regimes, and the head
phase of the large ones), every epoch of a plain `fit` computes the same
backbone forward pass again while the head's own update costs almost nothing.
Here the frozen part (preprocess -> backbone -> pooling) runs once per view,
and the head (feature_norm -> dropout -> predictions) trains on the pooled
features:

    images --(frozen, once per view)--> pooled features --(every epoch)--> head

Augmentation survives: the training pipeline is read `views` times, each
time freshly augmented, and every epoch draws one of those views. The head
model shares its layers with the full model, so training it trains the full
model's head: no weights are copied back, and the full model's predictions
equal the head's on the cached features.

Features live in memory up to `max_bytes`, else in `.npy` files in the run
folder (memory-mapped). No TensorFlow import: inputs are any iterable of
`(images, labels)` batches, or an `(x, y)` tuple of numpy arrays.

Example:
    cache = compute(model, data, views=2)
    head_model(model).fit(cache.train_batches(32, seed=0),
                          validation_data=(cache.val, cache.val_labels))
"""

import dataclasses
import hashlib
import math
import os
import time

import keras
import numpy as np

from tl_keras.arrays import as_labels

HEAD_LAYERS = ("feature_norm", "dropout", "predictions")  # the head, in order

# Forward passes that train nothing (cached features, evaluation, prediction,
# the advisor) run in batches this large: EfficientNet-Lite0 at 96 px on 2 CPU
# cores computed ~400 images/s at 256 against ~300 at 32, the same features to
# the bit (docs/performance.md). `config.inference_batch_size` sets it for a run.
INFERENCE_BATCH = 256


def extractor(model):
    """The frozen part of a classifier: raw pixels -> pooled backbone features."""
    return keras.Model(model.input, model.get_layer(HEAD_LAYERS[0]).input,
                       name="feature_extractor")


def head_model(model):
    """The head of a classifier as its own model, sharing the full model's head layers."""
    inputs = keras.Input(model.get_layer(HEAD_LAYERS[0]).input.shape[1:], name="features")
    x = inputs
    for name in HEAD_LAYERS:
        x = model.get_layer(name)(x)
    return keras.Model(inputs, x, name="head")


def norm_statistics(features, floor=1e-3):
    """(mean, variance) [D] with which `feature_norm` standardises `features` [N, D].

    A feature that barely varies in the training data (a random backbone has
    many) would be divided by almost zero and explode on new images, so each
    variance is at least `floor` times the features' mean variance; when no
    feature varies, the variances are 1.
    """
    features = np.asarray(features, "float64")
    mean, variance = features.mean(axis=0), features.var(axis=0)
    if variance.mean() > 0:
        variance = np.maximum(variance, floor * variance.mean())
    else:  # no feature varies at all (e.g. all 0 after a float16 underflow): scale 1
        variance = np.ones_like(variance)
    return mean, variance


def adapt_feature_norm(model, features, floor=1e-3):
    """Sets `feature_norm` to standardise `features` [N, D] (`norm_statistics`)."""
    mean, variance = norm_statistics(features, floor)
    layer = model.get_layer(HEAD_LAYERS[0])
    layer.set_weights([mean.astype("float32"), variance.astype("float32"),
                       np.asarray(len(features), layer.count.dtype)])
    layer.finalize_state()  # Normalization caches mean and variance as tensors


def sample(model, data, max_examples=4096, batch_size=32):
    """Pooled features of up to `max_examples` training images, for `adapt_feature_norm`."""
    extract = extractor(model)
    out, n = [], 0
    for x, _ in _batches(data.train, batch_size):
        out.append(np.asarray(extract.predict_on_batch(x), "float32"))
        n += len(out[-1])
        if n >= max_examples:
            break
    return np.concatenate(out)[:max_examples]


def views_to_cache(asked, epochs, augmented):
    """How many views of the training set to cache: `asked`, but at least one, no more
    than the epochs that draw from them, and one when the pipeline does not augment
    (every view would be the same)."""
    return min(max(1, int(asked)), epochs) if augmented else 1


@dataclasses.dataclass
class FeatureCache:
    train: list            # one [N, D] float32 array per view
    train_labels: list     # one labels array per view (each view is read in its own order):
                           # [N] int32 class indices, or [N, classes] float32 label vectors
    val: np.ndarray        # [M, D]
    val_labels: np.ndarray
    seconds: float         # time spent computing them
    stored: str            # "memory" or the folder of the .npy files

    @property
    def views(self):
        return len(self.train)

    def train_batches(self, batch_size, seed, drop_remainder=False):
        """A `keras.utils.PyDataset` over one view per epoch, reshuffled every epoch;
        with `drop_remainder`, only full batches."""
        return _ViewBatches(self.train, self.train_labels, batch_size, seed, drop_remainder)


@dataclasses.dataclass
class PhaseInputs:
    """What one training phase's `fit` reads: the full model on the data's
    pipelines, or the model's head on cached features (`on_cache`)."""

    model: object   # what `fit` trains
    train: object   # what `fit` reads
    val: object     # its validation data
    cached: bool    # the head on cached features

    @classmethod
    def through_backbone(cls, model, data):
        return cls(model, data.train, data.val, cached=False)

    @classmethod
    def on_cache(cls, model, cache, batch_size, seed, drop_remainder=False):
        """The head of `model` (`head_model`) on a `FeatureCache`: one view per epoch."""
        return cls(head_model(model), cache.train_batches(batch_size, seed, drop_remainder),
                   (cache.val, cache.val_labels), cached=True)


class FeatureStore(dict):
    """Feature caches kept across runs on the same data (tuner trials).

    A cache is keyed by what determines it: a fingerprint of every weight of
    the frozen part, its input and output shapes, and the number of views.
    Two trials that cut the same backbone at the same layer share their
    features; a trial whose backbone differs in any weight gets its own.
    Caches too big for memory go to `spill_root/<key>/`.

    Example:
        store = FeatureStore(spill_root="sweep/features")
        train.finetune(config, data, feature_store=store)  # computes
        train.finetune(other_config, data, feature_store=store)  # reuses, same cut
    """

    def __init__(self, spill_root=None):
        super().__init__()
        self.spill_root = spill_root

    @staticmethod
    def key(model, views):
        extract = extractor(model)
        digest = hashlib.sha1()
        for weight in extract.weights:
            digest.update(str(tuple(weight.shape)).encode())
            digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
        shapes = f"{extract.input.shape}->{extract.output.shape}x{views}"
        digest.update(shapes.encode())
        return digest.hexdigest()[:16]

    def spill_dir(self, key):
        return os.path.join(self.spill_root, key) if self.spill_root else None


def compute(model, data, views=1, batch_size=32, max_bytes=2 << 30, spill_dir=None,
            verbose=1, first_view=None, inference_batch=INFERENCE_BATCH, folded=None):
    """Runs the frozen part of `model` over `data.train` (`views` times) and `data.val` (once).

    Args:
      model: a classifier from `model.build_classifier`.
      data: `train` and `val` -- iterables of `(images, labels)` batches
        (e.g. tf.data pipelines; the training one augments each time it is
        read) or `(x, y)` numpy tuples -- and their sizes `train_examples`,
        `val_examples`.
      views: passes over `train`; 1 when the pipeline does not augment.
      batch_size: batch size for numpy inputs; the pipeline's when
        `data.drop_remainder` (each view then holds full batches only).
      max_bytes: features larger than this go to `.npy` files in `spill_dir`.
      verbose: 0 silent, 1 a progress bar per pass, 2 a line per pass.
      first_view: `(features, labels)` of the first read of `data.train`,
        computed already (by the regime advisor, advise.py): view 0 is taken
        from it, and the pipeline is read only for the other views.
      inference_batch: images per forward pass (pipelines are rebatched to it,
        in their order); falsy: `batch_size`. Pipelines that drop remainders
        (distributed runs) and spilled passes keep their own batches.
      folded: run in-memory passes as a constant-folded graph (folded.py);
        None: where `folded.usable()` (TensorFlow on a CPU, functions traced);
        False: `predict`.

    Returns:
      `FeatureCache`.
    """
    start = time.time()
    extract = extractor(model)
    dim = int(extract.output.shape[-1])
    n_train, n_val = int(data.train_examples), int(data.val_examples)
    if getattr(data, "drop_remainder", False):  # the pipeline gives full batches of `batch_size`
        n_train -= n_train % batch_size
    total_bytes = 4 * dim * (views * n_train + n_val)
    spill = total_bytes > max_bytes
    if spill and not spill_dir:
        raise ValueError(f"features need {total_bytes / 2**30:.1f} GiB, over the memory "
                         "limit, and no folder to spill them to")
    if spill:
        os.makedirs(spill_dir, exist_ok=True)
    if getattr(data, "drop_remainder", False) or not inference_batch:
        inference_batch = batch_size
    passes = _Passes(extract, spill_dir if spill else None, batch_size, inference_batch,
                     verbose, folded)
    train_views = []
    if first_view is not None:
        given, labels = first_view
        if np.shape(given) != (n_train, dim):
            raise ValueError(f"first_view holds features of shape {np.shape(given)}, "
                             f"expected {(n_train, dim)}")
        train_views.append((np.asarray(given, "float32"), as_labels(labels)))
    train_views += [passes.run(data.train, n_train, f"train_view{v}")
                    for v in range(len(train_views), views)]
    val_features, val_labels = passes.run(data.val, n_val, "val")
    return FeatureCache(
        train=[f for f, _ in train_views], train_labels=[y for _, y in train_views],
        val=val_features, val_labels=val_labels, seconds=time.time() - start,
        stored=spill_dir if spill else "memory")


class _Passes:
    """`compute`'s forward passes of the frozen part: in memory, folded once for all of
    them where `folded` says (folded.py), or, with a `spill_dir`, batch by batch into
    `.npy` files there."""

    def __init__(self, extract, spill_dir, batch_size, inference_batch, verbose, folded):
        from tl_keras import folded as folded_lib

        self.folded_lib = folded_lib
        self.extract, self.spill_dir, self.verbose = extract, spill_dir, verbose
        self.batch_size, self.inference_batch = batch_size, inference_batch
        self.folded = spill_dir is None and bool(folded or (folded is None
                                                            and folded_lib.usable()))
        self.run_with = folded_lib.fold(extract) if self.folded else extract

    def run(self, source, n, name):
        """(features [n, D] float32, labels (`as_labels`)) of one pass over `source`."""
        began = time.time()
        if self.spill_dir:  # batch by batch into files: `predict_on_batch`
            dim = int(self.extract.output.shape[-1])
            into = np.lib.format.open_memmap(os.path.join(self.spill_dir, f"{name}.npy"), "w+",
                                             "float32", (n, dim))
            out, labels = _pass_by_batch(self.extract, source, into, self.batch_size,
                                         self.verbose)
        else:
            if not isinstance(source, tuple):
                source = rebatch(source, self.inference_batch)
            out, labels = self.folded_lib.predict(
                self.run_with, source, int(self.inference_batch), verbose=int(self.verbose == 1),
                total=n, fold_it=self.folded)
            out = np.asarray(out, "float32")
        labels = as_labels(labels)
        if len(labels) != n:
            raise ValueError(f"{name}: the pipeline gave {len(labels)} examples, expected {n}")
        if self.verbose == 2:
            print(f"  {name}: {n} images, {time.time() - began:.1f} s", flush=True)
        return out, labels


def rebatch(source, batch_size):
    """The batched tf.data pipeline `source` in batches of `batch_size`, same order
    (its own API: no TensorFlow import here)."""
    return source.rebatch(int(batch_size)) if batch_size else source


def _pass_by_batch(extract, source, out, batch_size, verbose):
    """Features of one pass written batch by batch into `out` (a memory-mapped file)."""
    n = len(out)
    labels = []
    progress = keras.utils.Progbar(n, unit_name="image") if verbose == 1 else None
    i = 0
    for x, y in _batches(source, batch_size):
        f = np.asarray(extract.predict_on_batch(x), "float32")
        k = len(f)
        if i + k > n:
            raise ValueError(f"the pipeline gave more than its {n} examples")
        out[i:i + k] = f
        labels.append(keras.ops.convert_to_numpy(y))
        i += k
        if progress:
            progress.update(i)
    return out, np.concatenate(labels) if labels else np.empty((0,), "int32")


def _batches(source, batch_size):
    if isinstance(source, tuple):
        x, y = source
        for i in range(0, len(y), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
    else:
        yield from source


class _ViewBatches(keras.utils.PyDataset):
    """Batches of one cached view per epoch; a new view and a new order after every epoch."""

    def __init__(self, views, labels, batch_size, seed, drop_remainder=False):
        super().__init__()
        self.views, self.labels, self.batch_size = views, labels, batch_size
        self.drop_remainder = drop_remainder
        self.rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def __len__(self):
        n = len(self.labels[0]) / self.batch_size
        return math.floor(n) if self.drop_remainder else math.ceil(n)

    def __getitem__(self, i):
        idx = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])
        return self.views[self.view][idx], self.labels[self.view][idx]

    def on_epoch_end(self):
        self.view = int(self.rng.integers(len(self.views)))
        self.order = self.rng.permutation(len(self.labels[0]))
