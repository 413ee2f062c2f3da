"""Where a run trains: one device, or a tf.distribute strategy -- the training code's one
view of both (`Devices`: build in its scope, fit, evaluate, back up, who writes).

    train.finetune --> Devices(strategy) --> model.fit / model.evaluate on one device
                                         --> distribute.py (TensorFlow) under a strategy:
                                             its own loop for multi_worker

Example:
    on = Devices(strategy)  # None: one device
    with on.scope():
        model = ...
    on.fit(model, train, val, epochs=3)
"""

import contextlib

import keras

from tl_keras import keras_internals

# Validation on cached features runs in batches this large: a feature vector is
# small, and Keras' per-step overhead (~2 ms) dominated the validation of a
# head at 32 per batch (10,000 vectors: 313 steps every epoch). Equal results
# up to float rounding of the loss.
FEATURE_BATCH = 1024


class Devices:
    """A run's view of its strategy; one device when `strategy` is None.

    distribute.py (TensorFlow) is imported only when there is a strategy, so
    one-device runs need no TensorFlow (KERAS_BACKEND=jax).
    """

    def __init__(self, strategy):
        self.strategy = strategy
        self.lib = None
        if strategy is not None:
            from tl_keras import distribute
            self.lib = distribute
        self.loop = self.lib is not None and self.lib.uses_loop(strategy)
        self.chief = self.lib is None or self.lib.writes(strategy)

    def prepare(self, model):
        """`model` ready for `fit` under the strategy (distribute.fix_symbolic_build)."""
        if self.lib and not self.loop:
            self.lib.fix_symbolic_build(model)
        return model

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def batch_size(self, config):
        return self.lib.global_batch(config, self.strategy) if self.lib else config.batch_size

    def describe(self, config):
        """The `distribution` entry of metrics.json."""
        lib, strategy = self.lib, self.strategy
        return {"strategy": lib.name_of(strategy) if lib else "none",
                "replicas": lib.replicas(strategy) if lib else 1,
                "workers": lib.workers() if self.loop else 1,
                "batch_size_per_replica": int(config.batch_size),
                "global_batch_size": int(self.batch_size(config))}

    def fit(self, model, train_data, val_data, validation_freq=1, **kwargs):
        if self.loop:  # validates every epoch
            return self.lib.fit(model, self.strategy, train_data, val_data, **kwargs)
        keras_internals.build_before_tracing(model, train_data)  # one trace of the step
        return model.fit(train_data, validation_data=val_data,
                         # tf.data pipelines and PyDatasets shuffle themselves
                         shuffle=isinstance(train_data, tuple),
                         validation_freq=validation_freq, **kwargs)

    def evaluate(self, model, val):
        """`model`'s logs on `val`: {"loss": ..., the task's metric: ...}."""
        if self.loop:
            return self.lib.evaluate(model, self.strategy, val)
        if isinstance(val, tuple):  # cached features in memory: few, large batches
            return model.evaluate(*val, batch_size=FEATURE_BATCH, verbose=0, return_dict=True)
        return model.evaluate(val, verbose=0, return_dict=True)

    def backup(self, path):
        """BackupAndRestore at `path`; restore-only on a worker that is not the chief."""
        if self.chief:
            return keras.callbacks.BackupAndRestore(path)
        return keras_internals.ReadOnlyBackup(path)
