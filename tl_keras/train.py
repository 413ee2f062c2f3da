"""Training: build the model for a regime, run its phases with `model.fit`, write the run folder.

No TensorFlow import here: given numpy arrays instead of tf.data pipelines,
the same code runs with `KERAS_BACKEND=jax`. Given a tf.distribute strategy,
models are built and compiled in its scope, and a multi-worker run trains
through `distribute.fit` (distribute.py), its chief alone writing the run folder
(devices.py: the one view of one device or a strategy).

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
import warnings

import keras
import numpy as np

from tl_keras import backbones, callbacks as callbacks_lib, devices, features
from tl_keras import model as model_lib
from tl_keras import plan as plan_lib
from tl_keras import recipe as recipe_lib, run_folder, tasks, trainable


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
        dropout=config.dropout, seed=config.seed, pool_grid=config.pool_grid,
        token_pool=config.token_pool, activation=plan.task.activation)
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
        phase's cached features start from it instead of computing it again
        (and when the first phase trains on no cached features, `feature_norm`'s
        statistics come from it: the advisor's fine-tuned pilot, a
        `--regime=auto` run with `cache_features=False`).

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
    dist = devices.Devices(strategy)
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
    logs = dist.evaluate(final.model, final.val)
    metrics = _metrics(plan, data, model, history, final, logs, dist.describe(config),
                       time.time() - start)
    if dist.chief:
        _publish(workdir, model, plan, metrics, final.best_is_final, save_models)
    return metrics


def _publish(workdir, model, plan, metrics, best_is_final, save_models):
    """The finished run's files: model.keras (a copy of best.keras when that holds the
    final weights), metrics.json, the report; the backups and spilled features removed."""
    if save_models:
        best_path = os.path.join(workdir, "best.keras")
        run_folder.write_atomically(
            os.path.join(workdir, "model.keras"),
            (lambda path: shutil.copyfile(best_path, path)) if best_is_final
            else (lambda path: model_lib.save_model(model, path)))
    run_folder.write_json(os.path.join(workdir, "metrics.json"), metrics)
    for scratch in ("backup", "features"):
        shutil.rmtree(os.path.join(workdir, scratch), ignore_errors=True)
    if save_models and plan.config.report:
        _draw(workdir, model, plan, metrics)
    run_folder.release(workdir)


def _metrics(plan, data, model, history, final, logs, distribution, seconds):
    """What metrics.json records of a finished run (with regime=auto, the advice too):
    the final model's validation `logs` under the task's names (`val_accuracy`)."""
    config = plan.config
    trainable_params, non_trainable_params = trainable.count_params(model)
    monitor = plan.task.monitor
    best = [r[monitor] for r in history if monitor in r]
    metrics = {
        "task": plan.task.name,
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
        monitor: float(logs[plan.task.metric]),
        "val_loss": float(logs["loss"]),
        f"best_{monitor}": float(max(best)) if best else None,
        "epochs_run": len(history),
        "phases": [p.name for p in plan.phases],
        "train_path": final.paths,  # phase -> "cached_features" | "fit"
        "class_weight": ({data.class_names[c]: round(w, 4) for c, w in
                          final.class_weight.items()} if final.class_weight else None),
        "cached_features": final.cache_info,
        "recipes": final.recipes,  # phase -> how it trained (recipe.py)
        "backend": keras.backend.backend(),
        "distribution": distribution,
        "wall_seconds": round(seconds, 2),
    }
    if "advice" in config:  # --regime=auto: what the advisor measured and decided
        metrics["advice"] = plan_lib.to_dict(config.advice)
    return metrics


def _draw(workdir, model, plan, metrics):
    """curves.png, regime.png, report.html (report.py); a failure to draw is a warning,
    as the run itself is finished and saved."""
    from tl_keras import report

    try:
        report.draw_run(workdir, model, plan.to_dict(), plan.phases)
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not draw the run's pictures and report: "
              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)


@dataclasses.dataclass
class _Final:
    """What the phases leave for the final evaluation and metrics.json."""

    class_weight: dict = None
    recipes: dict = dataclasses.field(default_factory=dict)  # phase -> its recipe as a dict
    paths: dict = dataclasses.field(default_factory=dict)    # phase -> "cached_features" | "fit"
    model: object = None  # the last phase's model and validation data (`PhaseInputs`)
    val: object = None
    cache_info: dict = None  # the cached features, when a phase trained on them
    best_is_final: bool = False  # best.keras holds the final weights: model.keras is a copy


@dataclasses.dataclass
class _PhaseRun:
    """What the phases of one run share: the model, the data, the run folder, the
    strategy, and the backbone features the first phase that needs them caches."""

    model: object
    plan: object
    data: object
    workdir: str
    dist: object
    feature_store: object = None
    save_models: bool = True
    first_view: object = None
    initial_epoch: int = 0
    cache: object = None  # features.FeatureCache, computed by the first phase that needs it
    cache_reused: bool = False  # ... taken from the feature store

    def __post_init__(self):
        config = self.plan.config
        self.batch_size = self.dist.batch_size(config)
        self.verbose = plan_lib.verbosity(config.verbose)
        self.class_weight = class_weights(config, self.data, self.dist)
        # The recipe's size rule (BiT's HyperRule) made concrete for this data.
        self.phases = [dataclasses.replace(p, first_epoch=max(p.first_epoch, self.initial_epoch),
                                           recipe=recipe_lib.sized(p.recipe,
                                                                   self.data.train_examples))
                       for p in self.plan.phases if p.last_epoch > self.initial_epoch]

    def cache_info(self):
        """metrics.json's `cached_features`: None when no phase trained on them."""
        if self.cache is None:
            return None
        return {"views": self.cache.views, "seconds": round(self.cache.seconds, 2),
                "stored": self.cache.stored, "reused": self.cache_reused}


def run_phases(model, plan, data, workdir, initial_epoch=0, feature_store=None,
               save_models=True, dist=None, first_view=None):
    """Runs the phases of `plan` on `model`; returns (history rows of all epochs, `_Final`).

    Each phase is `run_phase`'s named steps. A phase that trains only the head
    of a frozen backbone trains it on cached backbone features when
    `config.cache_features` (see features.py), taken from `feature_store` when
    it holds them. A phase that finished in an earlier, interrupted attempt is
    not redone: its weights are loaded from `backup/<phase>.done.weights.h5`.
    Epochs before `initial_epoch` are not run: `model` comes with them done.
    `dist` (finetune's `devices.Devices`) says how to fit and who writes; by
    default one device. `first_view`: see `finetune`.
    """
    run = _PhaseRun(model, plan, data, workdir, dist or devices.Devices(None), feature_store,
                    save_models, first_view, initial_epoch)
    final = _Final(class_weight=run.class_weight,
                   recipes={p.name: dataclasses.asdict(p.recipe) for p in run.phases})
    history = []
    for phase in run.phases:
        inputs, best_model = run_phase(run, phase)
        final.paths[phase.name] = "cached_features" if caches_features(run, phase) else "fit"
        final.model, final.val = inputs.model, inputs.val
        if best_model is not False:  # False: finished in an earlier attempt
            final.best_is_final = best_model is not None and best_model.holds_final
        history += run_folder.read_history(workdir, phase.first_epoch, phase.last_epoch)
    final.cache_info = run.cache_info()
    return history, final


def run_phase(run, phase):
    """One phase: apply the regime -> its inputs -> compile -> callbacks -> fit -> mark done
    (or, finished in an earlier attempt, restore its weights). Returns (its
    `features.PhaseInputs`, its `callbacks.BestModel` or None; False when it was restored)."""
    with run.dist.scope():
        trainable.apply_phase(run.model, phase)
    done = os.path.join(run.workdir, "backup", f"{phase.name}.done.weights.h5")
    finished = os.path.exists(done)
    inputs = phase_inputs(run, phase, finished)
    if (phase is run.phases[0] and not finished and run.initial_epoch == 0
            and run.plan.config.init == "pretrained"):
        # Statistics of the starting backbone's features. A finished first
        # phase has them in its saved weights, loaded below; a resumed
        # unfinished one gets its saved ones back from BackupAndRestore.
        # A backbone trained from random weights keeps the identity: its
        # starting features are tiny (variance ~1e-25 for MobileNetV2), and
        # statistics frozen at that scale would blow its trained features
        # up by ~1e12 (losses in the millions).
        # The features are the cache's, else the first view's (the advisor's), else a pass.
        features.adapt_feature_norm(
            run.model, run.cache.train[0] if inputs.cached else run.first_view[0]
            if run.first_view is not None else features.sample(run.model, run.data))
    compile_phase(run, phase, inputs)
    if finished:
        with warnings.catch_warnings():  # its optimizer's state is not trained on again
            warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
            run.model.load_weights(done)
        print(f"Phase {phase.name!r} finished in an earlier attempt; weights restored.")
        return inputs, False
    announce(run, phase, inputs)
    best_model = fit_phase(run, phase, inputs, phase_callbacks(run, phase, inputs))
    mark_done(run, phase, inputs, done)
    return inputs, best_model


def caches_features(run, phase):
    """Whether `phase` trains its head on cached features. Multi-worker runs train
    through the frozen backbone: every worker would compute every feature, and
    their loop takes only tf.data pipelines."""
    return (bool(run.plan.config.cache_features) and phase.train == "head"
            and not run.dist.loop)


def phase_inputs(run, phase, finished):
    """The phase's `features.PhaseInputs`: its head on cached features, computed once
    (and not for a finished phase unless the final evaluation needs them), or the
    full model on the data's pipelines."""
    cached = caches_features(run, phase)
    if cached and run.cache is None and (not finished or phase is run.phases[-1]):
        with run.dist.scope():  # the frozen part runs on every replica
            run.cache, run.cache_reused = feature_cache(run, phase)
    if cached and run.cache is not None:
        with run.dist.scope():  # a model takes the strategy it is created under
            inputs = features.PhaseInputs.on_cache(
                run.model, run.cache, run.batch_size, seed=run.plan.config.seed,
                drop_remainder=getattr(run.data, "drop_remainder", False))
        run.dist.prepare(inputs.model)
    else:
        inputs = features.PhaseInputs.through_backbone(run.model, run.data)
        if phase.recipe.mixes:
            inputs = dataclasses.replace(inputs, train=mixed_batches(run, phase))
    return inputs


def mixed_batches(run, phase):
    """The data's training batches mixed as the phase's recipe says (mixup or CutMix)."""
    recipe = phase.recipe
    if isinstance(run.data.train, tuple):
        raise ValueError(f"batch_augment={recipe.batch_augment!r} mixes tf.data batches; "
                         "this data is numpy arrays")
    from tl_keras import augment  # TensorFlow: only when mixing

    mix = augment.Mix(recipe.batch_augment, recipe.mix_alpha, len(run.data.class_names))
    return augment.mix_batches(run.data.train, mix, run.plan.config.seed)


def feature_cache(run, phase):
    """(`features.FeatureCache` of the frozen part on the data, whether the run's
    feature store had it)."""
    config, data, store = run.plan.config, run.data, run.feature_store
    views = features.views_to_cache(config.cached_views, phase.last_epoch - phase.first_epoch,
                                    getattr(data, "augmented", False))
    key = store.key(run.model, views) if store is not None else None
    if key is not None and key in store:
        print(f"Backbone features: reusing the {views} view(s) computed by an earlier run")
        return store[key], True
    print(f"Caching backbone features: {views} view(s) of {data.train_examples} training "
          f"and {data.val_examples} validation images"
          f"{' (the first from the advisor)' if run.first_view is not None else ''}")
    cache = features.compute(
        run.model, data, views=views, batch_size=run.batch_size,
        max_bytes=config.feature_cache_bytes,
        spill_dir=(store.spill_dir(key) if key is not None
                   else os.path.join(run.workdir, "features")),
        verbose=run.verbose, first_view=run.first_view,
        inference_batch=config.inference_batch_size,
        # tf.distribute runs keep Keras' predict, which spreads batches over replicas.
        folded=None if config.folded_inference and run.dist.strategy is None else False)
    if key is not None:
        store[key] = cache
    return cache, False


def compile_phase(run, phase, inputs):
    """Compiles what the phase trains, and the full model even when only its head
    trains, so model.keras loads ready to evaluate."""
    config, model = run.plan.config, run.model
    with run.dist.scope():  # the optimizers' variables are the strategy's
        for m in {id(model): model, id(inputs.model): inputs.model}.values():
            m.compile(
                optimizer=recipe_lib.optimizer(
                    phase, steps_per_epoch(run.data, run.batch_size), model),
                loss=phase_loss(run, phase),
                metrics=run.plan.task.metrics(soft=phase.recipe.mixes),
                jit_compile=config.jit_compile,
                # A head step on cached features is a few microseconds of
                # arithmetic: many per call into the backend, not one. (Not
                # under tf.distribute: MirroredStrategy's multi-step loop
                # fails on the cached batches, a PyDataset.)
                steps_per_execution=(int(config.head_steps_per_execution)
                                     if m is inputs.model and inputs.cached
                                     and run.dist.strategy is None else 1))
        if inputs.model is not model:
            # Built now, so best.keras and model.keras load without warnings.
            model.optimizer.build(model.trainable_variables)


def phase_loss(run, phase):
    """The plan's loss; one that also takes mixed labels (mixup, CutMix) in training and
    crisp ones in validation; a multi-label run's with class_weight=balanced weighs each
    label's positives (single-label's class weights go to `fit`)."""
    task, config = run.plan.task, run.plan.config
    positive = ([run.class_weight[c] for c in range(len(run.data.class_names))]
                if task.vector_labels and run.class_weight else None)
    if not phase.recipe.mixes and positive is None:
        return run.plan.loss
    return task.loss(config.label_smoothing, soft=phase.recipe.mixes, positive_weights=positive)


def steps_per_epoch(data, batch_size):
    """Training steps in one epoch of `data` (a recipe's schedule spans them)."""
    batches = data.train_examples / batch_size
    return int(batches) if getattr(data, "drop_remainder", False) else math.ceil(batches)


def announce(run, phase, inputs):
    print(f"Phase {phase.name!r}: epochs {phase.first_epoch + 1}-{phase.last_epoch}, "
          f"training {'the head' if phase.train == 'head' else 'everything'}"
          f"{' on cached features' if inputs.cached else ''}, "
          f"learning rate {phase.learning_rate:g}{phase.recipe.describe()}; "
          f"trainable / frozen params: {trainable.count_params(run.model)}")


def phase_callbacks(run, phase, inputs):
    """The divergence guard, backup (not on cached features), history.csv, TensorBoard,
    the recipe's (weight averaging, early stopping), best.keras."""
    dist, workdir = run.dist, run.workdir
    # First: a diverged epoch stops the run before anything saves its weights.
    callbacks = [callbacks_lib.DivergenceGuard(phase, run.plan.config)]
    if not inputs.cached:
        # Resumes a killed phase at its last finished epoch. A head phase on
        # cached features is not backed up each epoch (0.07 s a save, its
        # epochs ~0.2 s): killed, it runs again from its first epoch, in
        # seconds, on features that must be computed again anyway.
        callbacks.append(dist.backup(os.path.join(workdir, "backup", phase.name)))
    if dist.chief:  # a multi-worker run's other workers write nothing
        callbacks.append(
            keras.callbacks.CSVLogger(os.path.join(workdir, "history.csv"), append=True))
    if dist.chief and _has_tensorflow():  # Keras' TensorBoard callback writes with tf.summary
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(workdir, "logs")))
    # After the backup (it saves the weights being trained), before best.keras (it saves
    # the averaged weights, which are swapped in at the end of each epoch).
    callbacks += recipe_lib.callbacks(phase, workdir,
                                      best_record=os.path.join(workdir, "backup", "best.json"),
                                      monitor=run.plan.task.monitor)
    if run.save_models and dist.chief:
        # A cached head's epochs take a fraction of a second and saving the
        # full model ~0.75 s: its best weights are kept in memory, saved once.
        callbacks.append(callbacks_lib.BestModel(run.model, workdir, defer=inputs.cached,
                                                 changing=inputs.model,
                                                 monitor=run.plan.task.monitor))
    return callbacks


def fit_phase(run, phase, inputs, callbacks):
    """`fit` from the phase's first epoch to its last; returns its `callbacks.BestModel` or None."""
    class_weight = None if run.plan.task.vector_labels else run.class_weight  # phase_loss's
    run.dist.fit(inputs.model, inputs.train, inputs.val,
                 initial_epoch=phase.first_epoch, epochs=phase.last_epoch,
                 verbose=run.verbose, callbacks=callbacks,
                 validation_freq=int(run.plan.config.validation_freq),
                 **({"class_weight": class_weight} if class_weight else {}),
                 **({"validation_batch_size": devices.FEATURE_BATCH} if inputs.cached else {}))
    return next((c for c in callbacks if isinstance(c, callbacks_lib.BestModel)), None)


def mark_done(run, phase, inputs, done):
    """Writes the phase's weights as finished: a resumed run does not train it again.
    Not after a last phase on cached features (0.4 s to write the full model):
    the run ends a second later, and one killed within it trains that head again.
    (A cached phase has no backup folder of its own to hold the file.)"""
    if run.dist.chief and not (inputs.cached and phase is run.phases[-1]):
        os.makedirs(os.path.dirname(done), exist_ok=True)
        run_folder.write_atomically(done, run.model.save_weights)


def class_weights(config, data, dist=None):
    """{class index: weight} for `config.class_weight="balanced"` (scikit-learn's
    `compute_class_weight`: n / (classes x images of the class)), else None.
    Classes without training images keep weight 1. Multi-label: each label's positive
    weight, images without it over images with it (`phase_loss`)."""
    if config.class_weight != "balanced":
        return None
    if tasks.get_task(config.task).vector_labels:
        counts = np.asarray(data.train_label_counts, "float64")
        return {int(c): float((data.train_examples - n) / n) if n else 1.0
                for c, n in enumerate(counts)}
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


def _has_tensorflow():
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except ImportError:
        return False
