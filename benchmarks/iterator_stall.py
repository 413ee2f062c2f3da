"""Epoch boundaries of `fit` on tl_keras' pipelines, with tf.data's autotuning and without.

Run:  python benchmarks/iterator_stall.py [--repeats=2] [--epochs=12] [--images=4000]
          [--out=benchmarks/results_iterator_stall.jsonl]

Keras makes a new iterator of the training data each epoch (and of the validation data
each evaluation) and drops the last. An autotuned tf.data iterator runs a model thread
that sleeps between tuning rounds, each twice as long as the last, up to 60 s; dropping
the iterator cancels the thread and waits for it. TensorFlow wakes the thread before it
marks the cancellation done (tsl's `CancellationManager::StartCancelWithStatus` runs the
callbacks first), so a thread that looks in that moment sleeps out its round while the
main thread waits, cores idle (docs/testing.md, "Stalls").

The same model, data and seed trained with `data.make_datasets`' pipelines as they are
(`data.without_tuning_thread`: `options.autotune.enabled = False`) and with autotuning on
again (as they were before), alternating, in one process, nothing else running: 4,000
random 64 px images (--images), batch 32, a small CNN, so that an epoch takes a few
seconds and the map keeps both cores busy. Measured per epoch: the time from
`on_epoch_begin` to the first batch (the old training iterator is dropped there), from
`on_test_begin` to the first validation batch, and the epoch's whole time.

One JSON line per run to --out: autotune, the per-epoch gaps and times, their sums.
"""

import json
import os
import sys
import time

import keras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


class Gaps(keras.callbacks.Callback):
    """Seconds from each epoch's (and evaluation's) start to its first batch, and each
    epoch's whole time."""

    def __init__(self):
        super().__init__()
        self.train, self.test, self.epochs = [], [], []
        self.first = None  # the list the next batch's wait goes to

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_began = self.mark = time.perf_counter()
        self.first = self.train

    def on_train_batch_begin(self, batch, logs=None):
        self._first_batch(self.train)

    def on_test_begin(self, logs=None):
        self.mark = time.perf_counter()
        self.first = self.test

    def on_test_batch_begin(self, batch, logs=None):
        self._first_batch(self.test)

    def _first_batch(self, waits):
        if self.first is waits:
            waits.append(time.perf_counter() - self.mark)
            self.first = None

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(time.perf_counter() - self.epoch_began)


def run(autotune, epochs, images):
    import numpy as np
    import tensorflow as tf

    from tl_keras import data
    from tl_keras.configs import smoke

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, 64, 64, 3), "uint8")
    y = np.arange(images) % 4
    examples = data.from_arrays(x, y, class_names=list("abcd"), val_fraction=0.2, seed=0)
    config = smoke.get_config("small_similar")
    config.augment = False
    datasets = data.make_datasets(examples, config, image_size=64, batch_size=32)
    train, val = datasets.train, datasets.val  # as data.py makes them: no autotuning thread
    if autotune:  # as they were before
        options = tf.data.Options()
        options.autotune.enabled = True
        train, val = train.with_options(options), val.with_options(options)
    assert train.options().autotune.enabled is autotune
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64, 64, 3)), keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(64, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    gaps = Gaps()
    began = time.perf_counter()
    model.fit(train, validation_data=val, epochs=epochs, verbose=0, callbacks=[gaps])
    return {"autotune": autotune, "images": images,
            "seconds": round(time.perf_counter() - began, 2),
            "train_gaps": [round(g, 2) for g in gaps.train],
            "val_gaps": [round(g, 2) for g in gaps.test],
            "epochs": [round(e, 2) for e in gaps.epochs],
            "gaps_sum": round(sum(gaps.train) + sum(gaps.test), 2)}


def main():
    from export_time import arguments

    args = arguments(__doc__, "results_iterator_stall.jsonl", repeats=2, epochs=12,
                     images=4000)
    order = [True, False]
    with open(args.out, "a") as out:
        for _ in range(args.repeats):
            for autotune in order:
                row = run(autotune, args.epochs, args.images)
                print(json.dumps(row), flush=True)
                out.write(json.dumps(row) + "\n")
            order.reverse()  # the other one first


if __name__ == "__main__":
    main()
