"""The callbacks a run adds to `fit` (train.phase_callbacks): the divergence guard, which
stops a run whose loss stops being finite before anything saves those weights, and
best.keras, the full classifier at its best validation score so far.

Example:
    callbacks = [DivergenceGuard(phase, config), ..., BestModel(model, workdir)]
"""

import math
import os

import keras

from tl_keras import model as model_lib, run_folder


class Diverged(ValueError):
    """The loss or the validation loss stopped being a finite number: the run stops,
    nothing is saved as finished, and what was saved before stays."""


class DivergenceGuard(keras.callbacks.Callback):
    """Raises `Diverged` at the first batch whose loss, or the first epoch whose loss or
    validation loss, is not finite: before any later callback saves those weights, so
    best.keras and the backup keep the last good ones, and no model.keras or
    metrics.json is written as if the run had finished."""

    def __init__(self, phase, config):
        super().__init__()
        self.phase, self.config, self.epoch = phase, config, phase.first_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._check(logs, ("loss",), f"batch {batch + 1} of epoch {self.epoch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        self._check(logs, ("loss", "val_loss"), f"epoch {epoch + 1}")

    def _check(self, logs, keys, where):
        for key in keys:
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(float(value)):
                from tl_keras import lr_find

                rate_key = lr_find.rate_key(self.phase)
                raise Diverged(
                    f"training diverged in phase {self.phase.name!r} at {where}: the "
                    f"{key.replace('_', ' ')} became {float(value)} at {rate_key}="
                    f"{self.config[rate_key]:g}; nothing was saved as finished (best.keras "
                    f"and the backup keep the last good weights): try a lower {rate_key} "
                    "(tools/lr_find.py suggests one) or clipnorm")


class BestModel(keras.callbacks.Callback):
    """Saves the full classifier to best.keras whenever `monitor` (the task's validation
    metric, `val_accuracy`) beats the best so far.

    The full model, even when `fit` trains its head alone on cached features.
    The best value so far is kept in backup/best.json beside it, so a resumed
    run, or a phase after one finished in an earlier attempt, compares against
    the model best.keras holds instead of overwriting it with a worse one.
    With `defer`, the best weights are kept in memory and written when `fit`
    ends (a run killed before then keeps the previous phase's best.keras):
    those of `changing`, the model `fit` trains (a head on cached features
    shares its variables with the full model; the frozen rest never changes).
    """

    def __init__(self, full_model, workdir, defer=False, changing=None, monitor="val_accuracy"):
        super().__init__()
        self.monitor = monitor
        self.full_model = full_model
        self.changing = changing or full_model
        self.path = os.path.join(workdir, "best.keras")
        self.record = os.path.join(workdir, "backup", "best.json")
        self.defer = defer
        self.holds_final = False  # best.keras was written from the weights fit ended with
        self.last_epoch = None
        self.best = None
        self.pending = None  # defer: (epoch, weights) not yet written
        if os.path.exists(self.path) and os.path.exists(self.record):
            self.best = run_folder.read_json(self.record)[monitor]

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or math.isnan(value) or (self.best is not None and value <= self.best):
            return
        self.best = float(value)
        if self.defer:
            self.pending = (epoch, self.changing.get_weights())  # copies
        else:
            self._write(epoch)

    def on_epoch_begin(self, epoch, logs=None):
        self.last_epoch = epoch

    def on_train_end(self, logs=None):
        if self.pending is None:
            return
        epoch, weights = self.pending
        self.pending = None
        if epoch == self.last_epoch:  # the weights as they are now
            self._write(epoch)
            self.holds_final = True
            return
        current = self.changing.get_weights()
        self.changing.set_weights(weights)
        try:
            self._write(epoch)
        finally:
            self.changing.set_weights(current)

    def _write(self, epoch):
        run_folder.write_atomically(self.path,
                                    lambda path: model_lib.save_model(self.full_model, path))
        os.makedirs(os.path.dirname(self.record), exist_ok=True)
        run_folder.write_json(self.record, {"epoch": epoch + 1, self.monitor: self.best})
