import ast
import csv
import json
import os

import keras
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
    for module in ("torch_state_dict", "efficientnet_lite", "backbones", "model", "features",
                   "trainable", "train"):
        tree = ast.parse(open(os.path.join(ROOT, "tl_keras", module + ".py")).read())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(name.split(".")[0] == "tensorflow" for name in imported), module
