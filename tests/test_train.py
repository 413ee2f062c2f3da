import ast
import csv
import json
import os
import warnings

import keras
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from tl_keras import callbacks as callbacks_lib, data, features, losses, plan as plan_lib, run_folder
from tl_keras import train, trainable


def tiny_data(config):
    return data.load(config, image_size=config.image_size)


# --- Finished runs that several tests below read --------------------------------------

class Run:
    """A finished tiny run: its config, the metrics `finetune` returned, its run folder."""

    def __init__(self, config, metrics):
        self.config, self.metrics, self.workdir = config, metrics, config.workdir

    def path(self, *names):
        return os.path.join(self.workdir, *names)


def _finished_run(tmp_path_factory, images, regime, **overrides):
    """`train.finetune` of the tiny config; `Run.calls` counts how often it planned
    the phases and made the loss."""
    config = tiny_config(tmp_path_factory.mktemp(regime), regime, dataset=str(images),
                         **overrides)
    calls = {"plan_phases": 0, "loss": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainable, "plan_phases", counted("plan_phases", trainable.plan_phases))
        patch.setattr(losses, "crossentropy", counted("loss", losses.crossentropy))
        run = Run(config, train.finetune(config, data.load(config, image_size=config.image_size)))
    run.calls = calls
    return run


@pytest.fixture(scope="module")
def small_different_run(tmp_path_factory, shared_images):
    """small_different, 2 epochs on cached features that spill to the run folder."""
    return _finished_run(tmp_path_factory, shared_images, "small_different", epochs=2,
                         feature_cache_bytes=100)


@pytest.fixture(scope="module")
def uncached_run(tmp_path_factory, shared_images):
    """small_different, 1 epoch of plain `fit` (no cached features), label smoothing 0.2."""
    return _finished_run(tmp_path_factory, shared_images, "small_different", epochs=1,
                         cache_features=False, label_smoothing=0.2)


@pytest.fixture(scope="module")
def large_similar_run(tmp_path_factory, shared_images):
    """large_similar: 1 epoch of the head on cached features (spilled), 1 of everything."""
    return _finished_run(tmp_path_factory, shared_images, "large_similar", epochs=2,
                         head_epochs=1, feature_cache_bytes=100)


def test_run_folder_and_refusing_to_overwrite(small_different_run):
    run = small_different_run
    for name in ("config.json", "metrics.json", "history.csv", "model.keras", "best.keras", "logs"):
        assert os.path.exists(run.path(name)), name
    assert not os.path.exists(run.path("backup"))
    saved = json.load(open(run.path("metrics.json")))
    assert saved == run.metrics
    assert saved["cut_layer"] == "expanded_conv_project_bn"
    assert saved["class_names"] == ["cat", "dog", "fox"]
    assert (saved["train_examples"], saved["val_examples"]) == (17, 3)  # one per class held out
    assert saved["epochs_run"] == 2
    config_json = json.load(open(run.path("config.json")))
    assert config_json == plan_lib.resolve(run.config).to_dict()  # the resolved plan
    assert (config_json["cut"], config_json["image_size"]) == ("early", 32)
    rows = list(csv.DictReader(open(run.path("history.csv"))))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    model = keras.saving.load_model(run.path("model.keras"))
    loss, accuracy = model.evaluate(tiny_data(run.config).val, verbose=0)
    assert accuracy == pytest.approx(saved["val_accuracy"])

    before = {name: os.stat(run.path(name)).st_mtime_ns for name in os.listdir(run.workdir)}
    with pytest.raises(run_folder.RunFolderError, match="already holds a finished run"):
        train.finetune(run.config, tiny_data(run.config))
    assert {name: os.stat(run.path(name)).st_mtime_ns for name in os.listdir(run.workdir)} == before


def test_a_run_resolves_its_config_once(large_similar_run):
    # Two phases, yet their plan and the loss were made once, when the config was resolved.
    assert large_similar_run.metrics["phases"] == ["head", "finetune"]
    assert large_similar_run.calls == {"plan_phases": 1, "loss": 1}


@pytest.mark.parametrize("run_name, paths", [
    ("small_different_run", {"head": "cached_features"}),
    ("uncached_run", {"head": "fit"}),
    ("large_similar_run", {"head": "cached_features", "finetune": "fit"}),
])
def test_metrics_say_which_path_ran(request, run_name, paths):
    run = request.getfixturevalue(run_name)  # finished runs shared with other tests
    assert run.metrics["train_path"] == paths
    saved = json.load(open(run.path("metrics.json")))
    assert saved["train_path"] == paths
    if run.config.cache_features:
        assert saved["cached_features"]["views"] == 1  # tiny_config: no augmentation
        assert run.config.feature_cache_bytes == 100  # too small: spilled to the run folder
        assert saved["cached_features"]["stored"] == run.path("features")
    else:
        assert saved["cached_features"] is None
    assert not os.path.exists(run.path("features"))  # removed when done


@pytest.mark.parametrize("run_name", ["small_different_run", "uncached_run"])
def test_feature_norm_standardises_the_training_features(request, run_name):
    import keras

    run = request.getfixturevalue(run_name)  # statistics from cached features / a sample
    datasets = tiny_data(run.config)
    model = keras.saving.load_model(run.path("model.keras"))
    x = np.concatenate([x for x, _ in datasets.train.as_numpy_iterator()])
    raw = features.extractor(model).predict(x, verbose=0)
    z = np.asarray(model.get_layer("feature_norm")(raw))
    varying = raw.std(axis=0) > 1e-3 * np.abs(raw).max()
    # Something to standardise: the raw features are far from unit variance.
    assert varying.sum() > 10 and abs(np.log(raw[:, varying].std(axis=0).mean())) > 1
    np.testing.assert_allclose(z[:, varying].mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(z[:, varying].std(axis=0), 1, rtol=1e-2)


class Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise KeyboardInterrupt("killed")


class Worse(keras.callbacks.Callback):
    """Reports every epoch's val_accuracy as 0 to the callbacks after it."""

    def on_epoch_end(self, epoch, logs=None):
        logs["val_accuracy"] = 0.0


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_work(tmp_path, shared_images, monkeypatch,
                                                         capsys):
    config = tiny_config(tmp_path, "large_similar", dataset=str(shared_images),
                         epochs=4, head_epochs=1)
    monkeypatch.setattr(callbacks_lib, "DivergenceGuard", lambda *args: Crash())
    with pytest.raises(KeyboardInterrupt):
        train.finetune(config, tiny_data(config))  # dies in epoch 3, phase 2
    assert not os.path.exists(os.path.join(config.workdir, "metrics.json"))
    monkeypatch.undo()

    other = tiny_config(tmp_path, "large_similar", dataset=str(shared_images), epochs=5)
    with pytest.raises(run_folder.RunFolderError, match="another config .*epochs"):
        train.finetune(other, tiny_data(other))

    capsys.readouterr()
    best = os.path.join(config.workdir, "best.keras")
    best_before = (os.stat(best).st_mtime_ns, open(best, "rb").read())

    def no_features_pass(*args, **kwargs):
        raise AssertionError("the finished head phase's feature statistics are in its weights")

    monkeypatch.setattr(features, "sample", no_features_pass)
    monkeypatch.setattr(features, "compute", no_features_pass)
    # Every epoch after the resume is worse than the best before the crash:
    # best.keras must keep the model it holds.
    monkeypatch.setattr(callbacks_lib, "DivergenceGuard", lambda *args: Worse())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train.finetune(config, tiny_data(config))
    out = capsys.readouterr().out
    assert "Phase 'head' finished in an earlier attempt" in out
    # The finished phase's weights load without Keras' warning about its optimizer,
    # whose state the next phase does not use.
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]
    assert "Caching backbone features" not in out  # the finished head phase needs none
    rows = list(csv.DictReader(open(os.path.join(config.workdir, "history.csv"))))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]  # no epoch run twice
    assert metrics["epochs_run"] == 4 and metrics["phases"] == ["head", "finetune"]
    assert [float(r["val_accuracy"]) for r in rows[2:]] == [0.0, 0.0]
    assert (os.stat(best).st_mtime_ns, open(best, "rb").read()) == best_before
    assert metrics["best_val_accuracy"] == max(float(r["val_accuracy"]) for r in rows) > 0


def test_a_killed_head_phase_on_cached_features_runs_again_from_its_first_epoch(
        tmp_path, shared_images, small_different_run, monkeypatch):
    # No per-epoch backup in a cached head phase: killed, it reruns whole and
    # ends with the model an uninterrupted run (small_different_run's) ends with.
    config = tiny_config(tmp_path, "small_different", dataset=str(shared_images), epochs=2,
                         feature_cache_bytes=100)

    class CrashInEpoch2(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt("killed")

    monkeypatch.setattr(callbacks_lib, "DivergenceGuard", lambda *args: CrashInEpoch2())
    with pytest.raises(KeyboardInterrupt):
        train.finetune(config, tiny_data(config))
    assert not os.path.exists(os.path.join(config.workdir, "backup", "head"))
    monkeypatch.undo()
    metrics = train.finetune(config, tiny_data(config))
    rows = list(csv.DictReader(open(os.path.join(config.workdir, "history.csv"))))
    assert [r["epoch"] for r in rows] == ["0", "0", "1"]  # the phase ran again
    assert metrics["epochs_run"] == 2
    assert metrics["val_accuracy"] == small_different_run.metrics["val_accuracy"]
    resumed = keras.saving.load_model(os.path.join(config.workdir, "model.keras"))
    once = keras.saving.load_model(small_different_run.path("model.keras"))
    for a, b in zip(resumed.get_weights(), once.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_cached_head_phase_before_another_marks_itself_done_without_saving_models(
        tmp_path, shared_images):
    # Tuner trials and study cells save no models, so no best.json creates
    # backup/ for them, and a cached head phase has no BackupAndRestore folder:
    # its `done` weights must still be written (they were not, in CI).
    config = tiny_config(tmp_path, "large_similar", dataset=str(shared_images), epochs=2,
                         head_epochs=1)
    metrics = train.finetune(config, tiny_data(config), save_models=False)
    assert metrics["phases"] == ["head", "finetune"] and metrics["epochs_run"] == 2
    assert not os.path.exists(os.path.join(config.workdir, "best.keras"))


def test_a_cached_heads_best_model_is_written_once_with_the_best_epochs_weights(tmp_path):
    # Cached head phases keep their best weights in memory and write best.keras
    # when fit ends: it must hold the best epoch's weights, not the last ones,
    # and the model must be left with the weights it ended with.
    # Only the head's weights are kept: `changing`, which shares them with the model.
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(
        keras.layers.Dense(4, name="frozen")(inputs)))
    head_inputs = keras.Input((4,))
    head = keras.Model(head_inputs, model.get_layer("d")(head_inputs))
    frozen = model.get_layer("frozen").kernel.numpy()
    workdir = str(tmp_path)
    best = callbacks_lib.BestModel(model, workdir, defer=True, changing=head)
    kernel = model.get_layer("d").kernel
    path = os.path.join(workdir, "best.keras")
    for epoch, accuracy in enumerate([0.5, 0.75, 0.6]):
        best.on_epoch_begin(epoch)
        kernel.assign(np.full((4, 2), float(epoch), "float32"))
        best.on_epoch_end(epoch, {"val_accuracy": accuracy})
        assert not os.path.exists(path)  # nothing written per epoch
    best.on_train_end()
    saved = keras.saving.load_model(path)
    np.testing.assert_array_equal(saved.get_layer("d").kernel, 1.0)  # epoch 2 (index 1) was best
    np.testing.assert_array_equal(saved.get_layer("frozen").kernel, frozen)
    np.testing.assert_array_equal(kernel.numpy(), 2.0)  # the model as fit left it
    assert not best.holds_final
    assert run_folder.read_json(os.path.join(workdir, "backup", "best.json")) == {
        "epoch": 2, "val_accuracy": 0.75}

    # Best in the last epoch: best.keras holds the final weights, and says so
    # (finetune then copies it to model.keras instead of saving again).
    later = callbacks_lib.BestModel(model, workdir, defer=True)
    later.on_epoch_begin(3)
    kernel.assign(np.full((4, 2), 3.0, "float32"))
    later.on_epoch_end(3, {"val_accuracy": 0.8})
    later.on_train_end()
    assert later.holds_final
    np.testing.assert_array_equal(keras.saving.load_model(path).get_layer("d").kernel, 3.0)


def test_model_keras_equals_best_keras_when_the_last_epoch_was_best(small_different_run):
    run = small_different_run  # a head on cached features
    rows = list(csv.DictReader(open(run.path("history.csv"))))
    accuracies = [float(r["val_accuracy"]) for r in rows]
    final = keras.saving.load_model(run.path("model.keras"))
    best = keras.saving.load_model(run.path("best.keras"))
    same = [np.array_equal(a, b) for a, b in zip(final.get_weights(), best.get_weights())]
    # Equal weights exactly when the last epoch was strictly the best.
    assert all(same) == (accuracies[-1] > max(accuracies[:-1]))


def test_model_and_training_code_import_no_tensorflow():
    for module in ("plan", "arrays", "torch_state_dict", "efficientnet_lite", "backbones",
                   "model", "features", "trainable", "losses", "train", "run_folder", "tune",
                   "keras_internals"):
        tree = ast.parse(open(os.path.join(ROOT, "tl_keras", module + ".py")).read())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(name.split(".")[0] == "tensorflow" for name in imported), module


# float16 is paired with the regimes where it is realistic: the tiny random
# backbone standing in for a pretrained one, its BatchNorm frozen at initial
# statistics, shrinks activations until they underflow float16 to 0 (measured),
# so its gradients are never finite. Compiling a whole backbone's train step
# with XLA takes about a minute and a half here, hence `slow`. (Slow and `graph` tests
# trace TensorFlow's functions, as XLA needs: tests/conftest.py.)
@pytest.mark.parametrize("regime, policy, init, jit_compile", [
    pytest.param("small_similar", "mixed_bfloat16", "pretrained", True, marks=pytest.mark.slow),
    pytest.param("small_different", "mixed_float16", "pretrained", True,
                 marks=pytest.mark.graph),  # XLA compiles only traced functions
    pytest.param("large_similar", "mixed_bfloat16", "pretrained", True, marks=pytest.mark.slow),
    pytest.param("large_different", "mixed_float16", "scratch", False, marks=pytest.mark.slow)])
def test_mixed_precision_and_xla_keep_every_regime(tmp_path, shared_images, monkeypatch,
                                                  regime, policy, init, jit_compile):
    config = tiny_config(tmp_path, regime, dataset=str(shared_images), mixed_precision=policy,
                         jit_compile=jit_compile, init=init)
    compiled = []
    compile_ = keras.Model.compile

    def spy(model, *args, **kwargs):
        compiled.append(kwargs.get("jit_compile"))
        return compile_(model, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "compile", spy)
    metrics = train.finetune(config, tiny_data(config))
    assert compiled and all(c is jit_compile for c in compiled)  # every model fit, XLA or not
    assert keras.mixed_precision.dtype_policy().name == "float32"  # restored after the run
    assert np.isfinite(metrics["val_loss"])

    trained = keras.saving.load_model(os.path.join(config.workdir, "model.keras"), compile=False)
    conv = next(l for l in trained.get_layer("backbone").layers
                if isinstance(l, keras.layers.Conv2D))
    assert conv.dtype_policy.compute_dtype == policy.split("_")[1]
    assert conv.kernel.dtype == "float32"  # variables stay float32
    for name in ("preprocess", "feature_norm", "predictions"):
        assert trained.get_layer(name).dtype_policy.name == "float32", name
    assert trained.output.dtype == "float32"

    # The regime still holds: against the same model before training, a frozen
    # backbone is unchanged; phase 2 of a large regime moves it, but moves
    # BatchNorm's moving statistics only when training from scratch.
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        start, _ = train.build(plan_lib.resolve(config), 3, 3)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    before = {v.path: v.numpy() for v in start.get_layer("backbone").weights}
    after = {v.path: v.numpy() for v in trained.get_layer("backbone").weights}
    assert before.keys() == after.keys()
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    moving = {p for p in changed if "moving_" in p}
    if regime.startswith("small"):
        assert not changed
    elif init == "scratch":
        assert changed - moving and moving
    else:
        assert changed and not moving


def test_scratch_losses_are_on_the_scale_of_a_pretrained_run(tmp_path, shared_images):
    # Statistics of a random backbone's features (variance ~1e-25 for
    # MobileNetV2) frozen into feature_norm blew the trained features up by
    # ~1e12: losses in the millions. A backbone trained from random weights
    # keeps feature_norm at the identity.
    config = tiny_config(tmp_path, "large_different", dataset=str(shared_images), init="scratch",
                         backbone="seed_cnn")  # quick to trace; the rule is the same for any
    metrics = train.finetune(config, tiny_data(config))
    trained = keras.saving.load_model(os.path.join(config.workdir, "model.keras"), compile=False)
    mean, variance, _ = trained.get_layer("feature_norm").get_weights()
    np.testing.assert_array_equal(mean, 0)
    np.testing.assert_array_equal(variance, 1)
    rows = list(csv.DictReader(open(os.path.join(config.workdir, "history.csv"))))
    losses = [float(r[key]) for r in rows for key in ("loss", "val_loss")]
    assert max(losses) < 20 and metrics["val_loss"] < 20, losses  # 3 classes: ln 3 = 1.1 at chance


def test_label_smoothing_loss_equals_the_formula_and_saves(tmp_path, uncached_run):
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], "float32")
    labels = np.array([1, 2])
    loss = plan_lib.resolve(tiny_config(tmp_path, label_smoothing=0.1)).loss
    targets = np.eye(3)[labels] * 0.9 + 0.1 / 3
    expected = -(targets * np.log(probabilities)).sum(axis=1).mean()
    np.testing.assert_allclose(float(loss(labels, probabilities)), expected, rtol=1e-6)
    assert plan_lib.resolve(tiny_config(tmp_path)).loss == "sparse_categorical_crossentropy"
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.5"):
        plan_lib.resolve(tiny_config(tmp_path, label_smoothing=1.5))

    assert uncached_run.config.label_smoothing == 0.2
    loaded = keras.models.load_model(uncached_run.path("model.keras"))
    assert loaded.loss.label_smoothing == 0.2


@pytest.mark.slow  # three whole runs (docs/testing.md)
@pytest.mark.parametrize("regime", ["small_similar", "large_similar"])
def test_the_same_config_and_seed_give_the_same_run_with_augmentation(tmp_path, shared_images,
                                                                      regime):
    # small_similar: augmented views of cached features; large_similar's second phase:
    # augmented batches through the backbone.
    def run(name, seed=0):
        config = tiny_config(tmp_path / name, regime, dataset=str(shared_images), augment=True,
                             augment_zoom=0.2, augment_rotation=0.1, cached_views=2, seed=seed,
                             epochs=3 if regime == "small_similar" else 2, head_epochs=1,
                             report=False)
        metrics = train.finetune(config, tiny_data(config), save_models=False)
        return metrics, run_folder.read_history(config.workdir)

    (first, history), (again, repeated) = run("a"), run("b")
    assert first["train_path"] == ({"head": "cached_features"} if regime == "small_similar"
                                   else {"head": "cached_features", "finetune": "fit"})
    assert first["cached_features"]["views"] == (2 if regime == "small_similar" else 1)
    assert (first["val_accuracy"], first["val_loss"]) == (again["val_accuracy"], again["val_loss"])
    assert history == repeated  # every epoch's numbers, to the last digit
    if regime == "small_similar":  # (the cheaper run)
        other, _ = run("c", seed=1)
        assert other["val_loss"] != first["val_loss"]


def test_one_run_per_workdir_and_a_killed_runs_leftovers_go(tmp_path):
    import subprocess
    import sys

    def prepare_elsewhere():  # another process (run_folder alone: no Keras to import)
        code = ("import json, sys; from tl_keras import run_folder\n"
                "try: run_folder.prepare(sys.argv[1], json.loads(sys.argv[2]))\n"
                "except run_folder.RunFolderError as e: print(e)")
        return subprocess.run([sys.executable, "-c", code, workdir, json.dumps(settings)],
                              capture_output=True, text=True, check=True).stdout.strip()

    config = tiny_config(tmp_path)
    settings = plan_lib.resolve(config).to_dict()
    workdir = run_folder.prepare(config.workdir, settings)
    # A second process into the same workdir is refused while this one holds it.
    assert prepare_elsewhere() == (
        f"workdir {workdir!r} is in use by another run (process {os.getpid()}); "
        "wait for it to end, or choose another --workdir")
    # Killed mid-write (a stale temporary file), resumed: the leftover is removed.
    stale = os.path.join(workdir, f".best.{os.getpid() + 1}.partial.keras")
    open(stale, "w").close()
    run_folder.release(workdir)  # as if the process had ended
    assert not os.path.exists(os.path.join(workdir, ".lock"))
    run_folder.prepare(workdir, settings)
    assert not os.path.exists(stale)
    assert prepare_elsewhere().startswith(f"workdir {workdir!r} is in use by another run")
    run_folder.release(workdir)
    assert prepare_elsewhere() == f"Resuming the unfinished run in {workdir}"  # free now
    assert run_folder.prepare(workdir, settings) == workdir  # and so can this one again
    run_folder.release(workdir)


def test_a_config_json_that_is_not_a_runs_settings_is_one_line(tmp_path):
    config = tiny_config(tmp_path)
    os.makedirs(config.workdir)
    run_folder.write_json(os.path.join(config.workdir, "config.json"), [1, 2])
    with pytest.raises(run_folder.RunFolderError, match="holds a config.json that is not a "
                                                        r"run's settings \(a JSON object\)"):
        run_folder.check(config.workdir, plan_lib.resolve(config).to_dict())


def test_a_diverging_run_stops_in_one_line_and_publishes_nothing(tmp_path, shared_images,
                                                                 run_tool):
    # The probe's setting: a rate of 1e30 in phase 2. One line naming the phase, the
    # number and the key to lower, exit 2; the head phase's best.keras is kept; no
    # model.keras or metrics.json claims a finished run.
    workdir = tmp_path / "run"
    result = run_tool("finetune.py", "--config=configs/smoke.py:large_similar",
                      f"--dataset={shared_images}", f"--workdir={workdir}",
                      "--config.finetune_learning_rate=1e30", "--config.augment=false",
                      "--config.verbose=0", "--config.clipnorm=0")
    assert result.returncode == 2, result.stderr
    line = result.last_line()
    assert line.startswith("finetune.py: error: training diverged in phase 'finetune' at ")
    assert "finetune_learning_rate=1e+30" in line and "try a lower finetune_learning_rate" in line
    assert "Traceback" not in result.stderr
    assert not (workdir / "model.keras").exists() and not (workdir / "metrics.json").exists()
    best = keras.saving.load_model(workdir / "best.keras")
    assert all(np.isfinite(w).all() for w in best.get_weights())
