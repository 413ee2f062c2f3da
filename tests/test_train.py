import ast
import csv
import json
import os

import keras
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from tl_keras import data, features, train


def tiny_data(config):
    return data.load(config, image_size=config.image_size)


def test_run_folder_and_refusing_to_overwrite(tmp_path, image_folder):
    config = tiny_config(tmp_path, "small_different", dataset=str(image_folder), epochs=2)
    metrics = train.finetune(config, tiny_data(config))
    workdir = config.workdir
    for name in ("config.json", "metrics.json", "history.csv", "model.keras", "best.keras", "logs"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert not os.path.exists(os.path.join(workdir, "backup"))
    saved = json.load(open(os.path.join(workdir, "metrics.json")))
    assert saved == metrics
    assert saved["cut_layer"] == "expanded_conv_project_bn"
    assert saved["class_names"] == ["cat", "dog", "fox"]
    assert (saved["train_examples"], saved["val_examples"]) == (17, 3)  # one per class held out
    assert saved["epochs_run"] == 2
    assert json.load(open(os.path.join(workdir, "config.json")))["cut"] == "early"
    rows = list(csv.DictReader(open(os.path.join(workdir, "history.csv"))))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    model = keras.saving.load_model(os.path.join(workdir, "model.keras"))
    loss, accuracy = model.evaluate(tiny_data(config).val, verbose=0)
    assert accuracy == pytest.approx(saved["val_accuracy"])

    with pytest.raises(train.RunFolderError, match="already holds a finished run"):
        train.finetune(config, tiny_data(config))


class Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise KeyboardInterrupt("killed")


def test_killed_run_resumes_without_redoing_finished_work(tmp_path, image_folder, monkeypatch,
                                                         capsys):
    config = tiny_config(tmp_path, "large_similar", dataset=str(image_folder),
                         epochs=4, head_epochs=1)
    monkeypatch.setattr(keras.callbacks, "TerminateOnNaN", Crash)
    with pytest.raises(KeyboardInterrupt):
        train.finetune(config, tiny_data(config))  # dies in epoch 3, phase 2
    assert not os.path.exists(os.path.join(config.workdir, "metrics.json"))
    monkeypatch.undo()

    other = tiny_config(tmp_path, "large_similar", dataset=str(image_folder), epochs=5)
    with pytest.raises(train.RunFolderError, match="another config .*epochs"):
        train.finetune(other, tiny_data(other))

    capsys.readouterr()

    def no_features_pass(*args, **kwargs):
        raise AssertionError("the finished head phase's feature statistics are in its weights")

    monkeypatch.setattr(features, "sample", no_features_pass)
    monkeypatch.setattr(features, "compute", no_features_pass)
    metrics = train.finetune(config, tiny_data(config))
    out = capsys.readouterr().out
    assert "Phase 'head' finished in an earlier attempt" in out
    assert "Caching backbone features" not in out  # the finished head phase needs none
    rows = list(csv.DictReader(open(os.path.join(config.workdir, "history.csv"))))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]  # no epoch run twice
    assert metrics["epochs_run"] == 4 and metrics["phases"] == ["head", "finetune"]


def test_model_and_training_code_import_no_tensorflow():
    for module in ("arrays", "torch_state_dict", "efficientnet_lite", "backbones", "model",
                   "features", "trainable", "train", "tune"):
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
# with XLA takes about a minute and a half here, hence `slow`.
@pytest.mark.parametrize("regime, policy, init, jit_compile", [
    ("small_similar", "mixed_bfloat16", "pretrained", True),
    ("small_different", "mixed_float16", "pretrained", True),
    pytest.param("large_similar", "mixed_bfloat16", "pretrained", True, marks=pytest.mark.slow),
    ("large_different", "mixed_float16", "scratch", False)])
def test_mixed_precision_and_xla_keep_every_regime(tmp_path, image_folder, monkeypatch,
                                                  regime, policy, init, jit_compile):
    config = tiny_config(tmp_path, regime, dataset=str(image_folder), mixed_precision=policy,
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
        start, _ = train.build(train.resolve(config), 3, 3)
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


def test_label_smoothing_loss_equals_the_formula_and_saves(tmp_path, image_folder):
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], "float32")
    labels = np.array([1, 2])
    loss = train.loss(tiny_config(tmp_path, label_smoothing=0.1))
    targets = np.eye(3)[labels] * 0.9 + 0.1 / 3
    expected = -(targets * np.log(probabilities)).sum(axis=1).mean()
    np.testing.assert_allclose(float(loss(labels, probabilities)), expected, rtol=1e-6)
    assert train.loss(tiny_config(tmp_path)) == "sparse_categorical_crossentropy"
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.5"):
        train.resolve(tiny_config(tmp_path, label_smoothing=1.5))

    config = tiny_config(tmp_path, dataset=str(image_folder), label_smoothing=0.2)
    train.finetune(config, tiny_data(config))
    loaded = keras.models.load_model(os.path.join(config.workdir, "model.keras"))
    assert loaded.loss.label_smoothing == 0.2
