"""The task seam (tl_keras/tasks.py): the plan resolves `config.task` once, and the head,
the loss, the metrics, the monitored metric and decoding all come from it."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

from conftest import tiny_config
from tl_keras import data, plan as plan_lib, predict, tasks, train


def test_an_unknown_task_is_one_line_listing_the_tasks(tmp_path):
    with pytest.raises(ValueError, match=r"^unknown task 'multilabel'; valid tasks: single_label$"):
        plan_lib.resolve(tiny_config(tmp_path, task="multilabel"))


def test_single_label_decodes_the_top_k_with_a_softmax_head(tmp_path):
    task = tasks.get_task("single_label")
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.3, 0.3, 0.4]])
    assert task.decode(probabilities, ["cat", "dog", "fox"], top_k=2) == [
        [("dog", 0.7), ("fox", 0.2)], [("cat", 0.5), ("fox", 0.3)], [("fox", 0.4), ("cat", 0.3)]]
    plan = plan_lib.resolve(tiny_config(tmp_path))
    assert plan.task is tasks.SINGLE_LABEL and plan.task.monitor == "val_accuracy"
    assert plan.loss == "sparse_categorical_crossentropy"


@dataclasses.dataclass(frozen=True)
class _ProbeTask(tasks.Task):
    """Single-label under other names: a sigmoid head, its metric called `hits`."""

    def metrics(self, soft=False):
        return [keras.metrics.SparseCategoricalAccuracy(name=self.metric)]


def test_the_head_the_metric_and_the_best_model_follow_the_plans_task(tmp_path, shared_images,
                                                                     monkeypatch, capsys):
    # Were "softmax" or "val_accuracy" still assumed anywhere on the way, this run would
    # build a softmax head, or find no `val_hits` to keep best.keras by and record.
    probe = _ProbeTask("probe", activation="sigmoid", metric="hits")
    monkeypatch.setitem(tasks.TASKS, "probe", probe)
    config = tiny_config(tmp_path, "small_similar", task="probe", dataset=str(shared_images),
                         epochs=2)
    metrics = train.finetune(config, data.load(config, image_size=config.image_size))

    assert metrics["task"] == "probe"
    assert 0 <= metrics["val_hits"] <= 1 and "val_accuracy" not in metrics
    assert metrics["best_val_hits"] == max(
        float(row["val_hits"]) for row in _history(config.workdir))
    assert os.path.exists(os.path.join(config.workdir, "best.keras"))  # kept by val_hits
    model = keras.models.load_model(os.path.join(config.workdir, "model.keras"))
    assert model.get_layer("predictions").activation.__name__ == "sigmoid"
    with open(os.path.join(config.workdir, "config.json")) as f:
        assert json.load(f)["task"] == "probe"
    with open(os.path.join(config.workdir, "report.html")) as f:
        assert "val_hits" in f.read()
    assert "could not draw" not in capsys.readouterr().err
    found = predict.from_run(config.workdir)
    assert found.task is probe


def _history(workdir):
    import csv

    with open(os.path.join(workdir, "history.csv")) as f:
        return list(csv.DictReader(f))
