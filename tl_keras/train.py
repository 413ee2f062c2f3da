"""Training: build the model for a regime, run its phases with `model.fit`, write the run folder.

No TensorFlow import here: given numpy arrays instead of tf.data pipelines,
the same code runs with `KERAS_BACKEND=jax`. Given a tf.distribute strategy,
models are built and compiled in its scope, and a multi-worker run trains
through `distribute.fit` (distribute.py), its chief alone writing the run folder.

Everything reads the run's `Plan` (plan.py), resolved once. The run folder
(`config.workdir`; run_folder.py says what it holds) is resumed when a killed
run is re-run with the same config, and a finished run is never overwritten.

Example:
    plan = tl_keras.plan.resolve(config)
    data = tl_keras.data.load(plan.config, image_size=plan.image_size)
    metrics = finetune(plan, data)
"""

import contextlib
import dataclasses
import importlib.util
import math
import os
import shutil
import sys
import time

import keras
import numpy as np

from tl_keras import backbones, features, keras_internals, model as model_lib, plan as plan_lib
from tl_keras import run_folder, trainable


# Validation on cached features runs in batches this large: a feature vector is
# small, and Keras' per-step overhead (~2 ms) dominated the validation of a
# head at 32 per batch (10,000 vectors: 313 steps every epoch). Equal results
# up to float rounding of the loss.
FEATURE_BATCH = 1024


def build(plan, num_classes, channels):
    """The classifier `plan` asks for, before any phase is applied.

    Args:
      plan: a `plan.Plan` (or a config, resolved here).

    Returns:
      (model, cut_layer_name)
    """
    plan = plan_lib.resolve(plan)
    config = plan.config
    cut = backbones.build_backbone(
        config.backbone, weights=plan.weights, image_size=plan.image_size, cut=plan.cut)
    model = model_lib.build_classifier(
        cut.model, config.backbone, num_classes, channels=channels,
        dropout=config.dropout, seed=config.seed, pool_grid=config.pool_grid)
    return model, cut.layer


@contextlib.contextmanager
def dtype_policy(plan):
    """The plan's `mixed_precision` as Keras' global dtype policy, float32 again afterwards."""
    keras.mixed_precision.set_dtype_policy(plan.config.mixed_precision or "float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def finetune(plan, data, model=None, initial_epoch=0, feature_store=None, save_models=True,
             strategy=None, first_view=None):
    """Trains the plan's regime on `data` and writes the run folder.

    Args:
      plan: the run's `plan.Plan`, or a config (configs/base.py), resolved here.
      data: an object with `train`, `val` (anything `fit` takes: tf.data
        pipelines, or `(x, y)` numpy tuples), `class_names`, `channels`,
        `train_examples`, `val_examples` -- e.g. `tl_keras.data.Datasets`.
      model: the model `build(plan, ...)` returns, when already built
        (tuner trials); by default it is built here.
      initial_epoch: epochs before this one are taken as done by `model`'s
        weights (Keras Tuner's Hyperband continues a trial this way).
      feature_store: a `features.FeatureStore` whose cached features this
        run may reuse and adds to (tuner trials on the same data).
      save_models: write best.keras and model.keras (tuner trials do not).
      strategy: a `tf.distribute.Strategy` (`distribute.get_strategy`), or
        None for one device. `data` must then be batched at the global batch
        (`distribute.global_batch`). Under a multi-worker strategy only the
        chief writes the run folder.
      first_view: `(features, labels)` of the first read of `data.train` at
        the plan's cut, computed by the regime advisor (advise.py): the head
        phase's cached features start from it instead of computing it again.

    Returns:
      The metrics dict also written to `metrics.json`.
    """
    start = time.time()
    plan = plan_lib.resolve(plan)  # a config is checked here, before any work
    config = plan.config
    if not 0 <= initial_epoch < config.epochs:
        raise ValueError(f"initial_epoch must be in [0, epochs={config.epochs}), "
                         f"got {initial_epoch}")
    keras.utils.set_random_seed(config.seed)
    dist = _Distribution(strategy)
    with dtype_policy(plan):
        if model is None:
            # Built before the run folder exists, so a bad cut or weights file leaves nothing behind.
            with dist.scope():
                model, _ = build(plan, len(data.class_names), data.channels)
        dist.prepare(model)
        # Only the chief writes; another worker of a multi-worker run only
        # refuses a finished run as the chief does, instead of waiting for it.
        workdir = (run_folder.prepare(config.workdir, plan.to_dict()) if dist.chief
                   else run_folder.refuse_finished(config.workdir))
        history, final = run_phases(model, plan, data, workdir,
                                    initial_epoch=initial_epoch, feature_store=feature_store,
                                    save_models=save_models, dist=dist, first_view=first_view)

    # The last phase's model and validation data: the head on cached features
    # when that phase trained on them (equal to the full model's outputs).
    val_loss, val_accuracy = dist.evaluate(final.model, final.val)
    if save_models and dist.chief:
        best_path = os.path.join(workdir, "best.keras")
        run_folder.write_atomically(
            os.path.join(workdir, "model.keras"),
            (lambda path: shutil.copyfile(best_path, path)) if final.best_is_final
            else model.save)
    trainable_params, non_trainable_params = trainable.count_params(model)
    best = [r["val_accuracy"] for r in history if "val_accuracy" in r]
    metrics = {
        "regime": config.regime,
        "backbone": config.backbone,
        "weights": config.weights if config.init == "pretrained" else "none (init=scratch)",
        "init": config.init,
        "cut_layer": model.get_layer("backbone").layers[-1].name,
        "image_size": plan.image_size,
        "num_classes": len(data.class_names),
        "class_names": list(data.class_names),
        "train_examples": int(data.train_examples),
        "val_examples": int(data.val_examples),
        "skipped_files": len(getattr(data, "skipped", []) or []),
        "trainable_params": trainable_params,
        "non_trainable_params": non_trainable_params,
        "val_accuracy": float(val_accuracy),
        "val_loss": float(val_loss),
        "best_val_accuracy": float(max(best)) if best else None,
        "epochs_run": len(history),
        "phases": [p.name for p in plan.phases],
        "train_path": final.paths,  # phase -> "cached_features" | "fit"
        "class_weight": ({data.class_names[c]: round(w, 4) for c, w in
                          final.class_weight.items()} if final.class_weight else None),
        "cached_features": final.cache_info,
        "backend": keras.backend.backend(),
        "distribution": dist.describe(config),
        "wall_seconds": round(time.time() - start, 2),
    }
    if "advice" in config:  # --regime=auto: what the advisor measured and decided
        metrics["advice"] = plan_lib.to_dict(config.advice)
    if dist.chief:
        run_folder.write_json(os.path.join(workdir, "metrics.json"), metrics)
        for scratch in ("backup", "features"):
            shutil.rmtree(os.path.join(workdir, scratch), ignore_errors=True)
        if save_models and config.get("report", True):
            _draw(workdir, model, plan, metrics)
    return metrics


def _draw(workdir, model, plan, metrics):
    """curves.png, regime.png, report.html (report.py); a failure to draw is a warning,
    as the run itself is finished and saved."""
    from tl_keras import report

    try:
        report.draw_run(workdir, model, plan.to_dict(), metrics["phases"])
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not draw the run's pictures and report: "
              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)


class _Distribution:
    """`finetune`'s view of its strategy; one device when `strategy` is None.

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
        return model.fit(train_data, validation_data=val_data,
                         # tf.data pipelines and PyDatasets shuffle themselves
                         shuffle=isinstance(train_data, tuple),
                         validation_freq=validation_freq, **kwargs)

    def evaluate(self, model, val):
        if self.loop:
            return self.lib.evaluate(model, self.strategy, val)
        if isinstance(val, tuple):  # cached features in memory: few, large batches
            return model.evaluate(*val, batch_size=FEATURE_BATCH, verbose=0)
        return model.evaluate(val, verbose=0)

    def backup(self, path):
        """BackupAndRestore at `path`; restore-only on a worker that is not the chief."""
        if self.chief:
            return keras.callbacks.BackupAndRestore(path)
        return keras_internals.ReadOnlyBackup(path)


class _Final:
    """What `run_phases` leaves for the final evaluation and metrics.json."""

    def __init__(self):
        self.model = self.val = self.cache_info = self.class_weight = None
        self.best_is_final = False  # best.keras holds the final weights: model.keras is a copy
        self.paths = {}


def run_phases(model, plan, data, workdir, initial_epoch=0, feature_store=None,
               save_models=True, dist=None, first_view=None):
    """Runs the phases of `plan` on `model`; returns (history rows of all epochs, `_Final`).

    A phase that trains only the head of a frozen backbone trains it on
    cached backbone features when `config.cache_features` (see features.py),
    taken from `feature_store` when it holds them. A phase that finished in an
    earlier, interrupted attempt is not redone: its weights are loaded from
    `backup/<phase>.done.weights.h5`. Epochs before `initial_epoch` are not
    run: `model` comes with them done. `dist` (finetune's `_Distribution`)
    says how to fit and who writes; by default one device. `first_view`: see `finetune`.
    """
    dist = dist or _Distribution(None)
    config = plan.config
    batch_size = dist.batch_size(config)
    history = []
    verbose = int(config.verbose) if config.verbose != "auto" else (
        1 if sys.stdout.isatty() else 2)  # a progress bar on a terminal, a line per epoch in a log
    final = _Final()
    cache = None
    class_weight = class_weights(config, data, dist)
    final.class_weight = class_weight
    phases = [dataclasses.replace(p, first_epoch=max(p.first_epoch, initial_epoch))
              for p in plan.phases if p.last_epoch > initial_epoch]
    for phase in phases:
        with dist.scope():
            trainable.apply_phase(model, phase)
        done = os.path.join(workdir, "backup", f"{phase.name}.done.weights.h5")
        finished = os.path.exists(done)
        # Multi-worker runs train through the frozen backbone: every worker would
        # compute every feature, and the loop takes only tf.data pipelines.
        cached = bool(config.cache_features) and phase.train == "head" and not dist.loop
        final.paths[phase.name] = "cached_features" if cached else "fit"
        # Features are computed once, and not for a finished phase unless the
        # final evaluation needs them.
        if cached and cache is None and (not finished or phase is phases[-1]):
            with dist.scope():  # the frozen part runs on every replica
                cache, reused = _cached_features(model, config, data, workdir, verbose,
                                                 phase.last_epoch - phase.first_epoch,
                                                 feature_store, batch_size, first_view,
                                                 distributed=dist.strategy is not None)
            final.cache_info = {"views": cache.views, "seconds": round(cache.seconds, 2),
                                "stored": cache.stored, "reused": reused}
        if (phase is phases[0] and not finished and initial_epoch == 0
                and config.init == "pretrained"):
            # Statistics of the starting backbone's features. A finished first
            # phase has them in its saved weights, loaded below; a resumed
            # unfinished one gets its saved ones back from BackupAndRestore.
            # A backbone trained from random weights keeps the identity: its
            # starting features are tiny (variance ~1e-25 for MobileNetV2), and
            # statistics frozen at that scale would blow its trained features
            # up by ~1e12 (losses in the millions).
            features.adapt_feature_norm(
                model, cache.train[0] if cache is not None else features.sample(model, data))
        if cached and cache is not None:
            with dist.scope():  # a model takes the strategy it is created under
                fit_model = dist.prepare(features.head_model(model))
            train_data = cache.train_batches(batch_size, seed=config.seed,
                                             drop_remainder=getattr(data, "drop_remainder", False))
            val_data = (cache.val, cache.val_labels)
        else:
            fit_model, train_data, val_data = model, data.train, data.val
        final.model, final.val = fit_model, val_data
        with dist.scope():  # the optimizers' variables are the strategy's
            for m in {id(model): model, id(fit_model): fit_model}.values():
                # The full model is compiled even when only its head trains, so
                # model.keras loads ready to evaluate.
                m.compile(
                    optimizer=keras.optimizers.AdamW(
                        learning_rate=phase.learning_rate, weight_decay=config.weight_decay),
                    loss=plan.loss,
                    metrics=["accuracy"],
                    jit_compile=config.jit_compile,
                    # A head step on cached features is a few microseconds of
                    # arithmetic: many per call into the backend, not one. (Not
                    # under tf.distribute: MirroredStrategy's multi-step loop
                    # fails on the cached batches, a PyDataset.)
                    steps_per_execution=(int(config.get("head_steps_per_execution", 1))
                                         if m is fit_model and cached and dist.strategy is None
                                         else 1))
            if fit_model is not model:
                # Built now, so best.keras and model.keras load without warnings.
                model.optimizer.build(model.trainable_variables)
        if finished:
            model.load_weights(done)
            print(f"Phase {phase.name!r} finished in an earlier attempt; weights restored.")
            history += run_folder.read_history(workdir, phase.first_epoch, phase.last_epoch)
            continue
        print(f"Phase {phase.name!r}: epochs {phase.first_epoch + 1}-{phase.last_epoch}, "
              f"training {'the head' if phase.train == 'head' else 'everything'}"
              f"{' on cached features' if cached else ''}, "
              f"learning rate {phase.learning_rate:g}; "
              f"trainable / frozen params: {trainable.count_params(model)}")
        callbacks = [keras.callbacks.TerminateOnNaN()]
        if not cached:
            # Resumes a killed phase at its last finished epoch. A head phase on
            # cached features is not backed up each epoch (0.07 s a save, its
            # epochs ~0.2 s): killed, it runs again from its first epoch, in
            # seconds, on features that must be computed again anyway.
            callbacks.insert(0, dist.backup(os.path.join(workdir, "backup", phase.name)))
        if dist.chief:  # a multi-worker run's other workers write nothing
            callbacks.append(
                keras.callbacks.CSVLogger(os.path.join(workdir, "history.csv"), append=True))
        if dist.chief and _has_tensorflow():  # Keras' TensorBoard callback writes with tf.summary
            callbacks.append(keras.callbacks.TensorBoard(os.path.join(workdir, "logs")))
        best_model = None
        if save_models and dist.chief:
            # A cached head's epochs take a fraction of a second and saving the
            # full model ~0.75 s: its best weights are kept in memory, saved once.
            best_model = _BestModel(model, workdir, defer=cached, changing=fit_model)
            callbacks.append(best_model)
        fit = dist.fit(fit_model, train_data, val_data,
                       initial_epoch=phase.first_epoch, epochs=phase.last_epoch,
                       verbose=verbose, callbacks=callbacks,
                       validation_freq=int(config.get("validation_freq", 1)),
                       **({"class_weight": class_weight} if class_weight else {}),
                       **({"validation_batch_size": FEATURE_BATCH} if cached else {}))
        if fit_model.stop_training and any(
                v != v for v in fit.history.get("loss", [])):  # NaN: TerminateOnNaN
            raise FloatingPointError(f"loss became NaN in phase {phase.name!r}; "
                                     "try a lower learning rate")
        if dist.chief and not (cached and phase is phases[-1]):
            # Marks the phase finished: a resumed run does not train it again. Not
            # a last phase on cached features (0.4 s to write the full model): the
            # run ends a second later, and one killed within it trains that head again.
            # (A cached phase has no backup folder of its own to hold the file.)
            os.makedirs(os.path.dirname(done), exist_ok=True)
            run_folder.write_atomically(done, model.save_weights)
        final.best_is_final = best_model is not None and best_model.holds_final
        history += run_folder.read_history(workdir, phase.first_epoch, phase.last_epoch)
    return history, final


def class_weights(config, data, dist=None):
    """{class index: weight} for `config.class_weight="balanced"` (scikit-learn's
    `compute_class_weight`: n / (classes x images of the class)), else None.
    Classes without training images keep weight 1."""
    if config.get("class_weight", "none") != "balanced":
        return None
    if dist is not None and dist.loop:
        raise ValueError("class_weight=balanced is not supported with multi_worker "
                         "(its training loop takes no class weights)")
    from sklearn.utils.class_weight import compute_class_weight

    counts = getattr(data, "train_label_counts", None)
    if counts is None:  # a source that does not know its labels (TFDS): one pass
        labels = np.concatenate([np.asarray(y).reshape(-1) for _, y in data.train])
        counts = np.bincount(labels, minlength=len(data.class_names))
    counts = np.asarray(counts)
    present = np.flatnonzero(counts)
    weights = compute_class_weight("balanced", classes=present,
                                   y=np.repeat(np.arange(len(counts)), counts))
    out = {int(c): 1.0 for c in range(len(data.class_names))}
    out.update({int(c): float(w) for c, w in zip(present, weights)})
    return out


def _cached_features(model, config, data, workdir, verbose, epochs, store, batch_size,
                     first_view=None, distributed=False):
    """(`FeatureCache`, whether `store` had it) for `model`'s frozen part on `data`."""
    augmented = getattr(data, "augmented", False)
    views = features.views_to_cache(config.cached_views, epochs, augmented)
    key = store.key(model, views) if store is not None else None
    if key is not None and key in store:
        print(f"Backbone features: reusing the {views} view(s) computed by an earlier run")
        return store[key], True
    print(f"Caching backbone features: {views} view(s) of {data.train_examples} training "
          f"and {data.val_examples} validation images"
          f"{' (the first from the advisor)' if first_view is not None else ''}")
    cache = features.compute(
        model, data, views=views, batch_size=batch_size,
        max_bytes=config.get("cache_bytes", 2 << 30),
        spill_dir=store.spill_dir(key) if key is not None else os.path.join(workdir, "features"),
        verbose=verbose, first_view=first_view,
        inference_batch=config.get("inference_batch_size", features.INFERENCE_BATCH),
        # tf.distribute runs keep Keras' predict, which spreads batches over replicas.
        folded=None if config.get("folded_inference", True) and not distributed else False)
    if key is not None:
        store[key] = cache
    return cache, False


def _has_tensorflow():
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except ImportError:
        return False


class _BestModel(keras.callbacks.Callback):
    """Saves the full classifier to best.keras whenever val_accuracy beats the best so far.

    The full model, even when `fit` trains its head alone on cached features.
    The best value so far is kept in backup/best.json beside it, so a resumed
    run, or a phase after one finished in an earlier attempt, compares against
    the model best.keras holds instead of overwriting it with a worse one.
    With `defer`, the best weights are kept in memory and written when `fit`
    ends (a run killed before then keeps the previous phase's best.keras):
    those of `changing`, the model `fit` trains (a head on cached features
    shares its variables with the full model; the frozen rest never changes).
    """

    def __init__(self, full_model, workdir, defer=False, changing=None):
        super().__init__()
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
            self.best = run_folder.read_json(self.record)["val_accuracy"]

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_accuracy")
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
        run_folder.write_atomically(self.path, self.full_model.save)
        os.makedirs(os.path.dirname(self.record), exist_ok=True)
        run_folder.write_json(self.record, {"epoch": epoch + 1, "val_accuracy": self.best})
