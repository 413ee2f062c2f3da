"""The task seam (tl_keras/tasks.py): the plan resolves `config.task` once, and the head,
the loss, the metrics, the monitored metric and decoding all come from it; multi_label
through every regime and tool."""

import json
import os

import keras
import numpy as np
import pytest

from conftest import tiny_config, write_image_folder
from tl_keras import (augment, data, evaluate, export, litert, plan as plan_lib, predict,
                      tables, tasks, train)


def test_an_unknown_task_is_one_line_listing_the_tasks(tmp_path):
    with pytest.raises(ValueError, match=r"^unknown task 'multilabel'; valid tasks: "
                                         r"single_label, multi_label$"):
        plan_lib.resolve(tiny_config(tmp_path, task="multilabel"))


def test_single_label_decodes_the_top_k_with_a_softmax_head(tmp_path):
    task = tasks.get_task("single_label")
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.3, 0.3, 0.4]])
    assert task.decode(probabilities, ["cat", "dog", "fox"], top_k=2) == [
        [("dog", 0.7), ("fox", 0.2)], [("cat", 0.5), ("fox", 0.3)], [("fox", 0.4), ("cat", 0.3)]]
    plan = plan_lib.resolve(tiny_config(tmp_path))
    assert plan.task is tasks.SINGLE_LABEL and plan.task.monitor == "val_accuracy"
    assert plan.loss == "sparse_categorical_crossentropy"


def _history(workdir):
    import csv

    with open(os.path.join(workdir, "history.csv")) as f:
        return list(csv.DictReader(f))


# --- Several labels per image ----------------------------------------------------------

def test_multi_label_decodes_every_label_at_its_threshold_with_sigmoids(tmp_path):
    task = tasks.get_task("multi_label")
    probabilities = np.array([[0.9, 0.2, 0.6], [0.1, 0.4, 0.3], [0.5, 0.7, 0.95]])
    names = ["cat", "dog", "fox"]
    assert task.decode(probabilities, names) == [
        [("cat", 0.9), ("fox", 0.6)], [], [("fox", 0.95), ("dog", 0.7), ("cat", 0.5)]]
    assert task.decode(probabilities, names, thresholds=[0.95, 0.3, 0.5]) == [
        [("fox", 0.6)], [("dog", 0.4)], [("fox", 0.95), ("dog", 0.7)]]
    plan = plan_lib.resolve(tiny_config(tmp_path, task="multi_label"))
    assert (plan.task.activation, plan.task.monitor, plan.loss) == (
        "sigmoid", "val_mAP", "binary_crossentropy")
    smoothed = plan_lib.resolve(tiny_config(tmp_path, task="multi_label", label_smoothing=0.1))
    y = np.array([[1.0, 0.0]])
    p = np.array([[0.8, 0.3]])
    assert float(smoothed.loss(y, p)) == pytest.approx(  # targets 0.95 and 0.05
        -np.mean([0.95 * np.log(0.8) + 0.05 * np.log(0.2), 0.05 * np.log(0.3)
                  + 0.95 * np.log(0.7)]), rel=1e-5)


def test_multi_label_positive_weights_weigh_each_labels_positive_term():
    from tl_keras import losses

    y = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], "float32")
    p = np.array([[0.8, 0.3, 0.4], [0.2, 0.6, 0.1]], "float32")
    for smoothing in (0.0, 0.2):
        loss = tasks.get_task("multi_label").loss(smoothing, positive_weights=[2.0, 1.0, 3.0])
        t = y * (1 - smoothing) + 0.5 * smoothing
        expected = -np.mean(np.array([2.0, 1.0, 3.0]) * t * np.log(p)
                            + (1 - t) * np.log(1 - p), axis=-1).mean()
        assert float(loss(y, p)) == pytest.approx(expected, rel=1e-5)
        ones = losses.WeightedBinaryCrossentropy([1.0] * 3, smoothing)  # Keras' own, unweighted
        assert float(ones(y, p)) == pytest.approx(float(keras.losses.BinaryCrossentropy(
            label_smoothing=smoothing)(y, p)), rel=1e-5)


def test_the_multi_label_metric_is_the_mean_average_precision_over_labels():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    y = (rng.random((500, 4)) < 0.3).astype("float32")
    p = np.clip(0.3 * y + 0.8 * rng.random((500, 4)), 0, 1).astype("float32")
    mAP, micro_f1 = tasks.get_task("multi_label").metrics()
    mAP.update_state(y, p)
    micro_f1.update_state(y, p)
    assert float(mAP.result()) == pytest.approx(
        average_precision_score(y, p, average="macro"), abs=0.002)
    chosen = p >= 0.5
    tp = (chosen & (y > 0)).sum()
    assert float(micro_f1.result()) == pytest.approx(2 * tp / (chosen.sum() + y.sum()),
                                                     rel=1e-5)


def test_mixup_and_cutmix_mix_label_vectors_as_they_mix_class_indices():
    import tensorflow as tf

    images = tf.constant(np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3)), tf.uint8)
    labels = np.array([0, 2, 1, 1, 0, 2])
    for kind in ("mixup", "cutmix"):
        mix = augment.Mix(kind, alpha=0.4, num_classes=3)
        seed = tf.constant([3, 4], tf.int64)
        from_indices = mix(images, tf.constant(labels), seed)
        from_vectors = mix(images, tf.one_hot(labels, 3), seed)
        for a, b in zip(from_indices, from_vectors):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    several = tf.constant([[1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1]], tf.float32)
    _, mixed = augment.Mix("mixup", 0.4, 3)(images[:4], several, tf.constant([1, 2], tf.int64))
    np.testing.assert_allclose(mixed.numpy().sum(axis=0), several.numpy().sum(axis=0),
                               rtol=1e-6)  # a permutation mixed in: each label's mass kept


def write_multi_label_table(root, n=30, seed=0):
    """Images of `write_image_folder` listed with 1-3 labels each ("a|b"), "labels.csv"."""
    paths = write_image_folder(root, per_class=n // 3)
    rng = np.random.default_rng(seed)
    rows = []
    for path in paths:
        labels = [name for name in ("cat", "dog", "fox") if rng.random() < 0.5] or ["dog"]
        rows.append(f"{path.relative_to(root)},{'|'.join(labels)}")
    (root / "labels.csv").write_text("image,labels\n" + "\n".join(rows) + "\n")
    return root / "labels.csv", rows


def test_a_multi_label_table_gives_label_vectors_split_so_every_label_is_validated(tmp_path):
    table, rows = write_multi_label_table(tmp_path / "images")
    read = tables.read_file(str(table), tables.settings(), multi_label=True)
    assert read.labels[0] == tuple(sorted(rows[0].split(",")[1].split("|")))
    examples = data.from_table(read, seed=1, multi_label=True)
    assert examples.class_names == ["cat", "dog", "fox"]
    train_y = np.concatenate([y[None] for _, y in examples.train.as_numpy_iterator()])
    val_y = np.concatenate([y[None] for _, y in examples.val.as_numpy_iterator()])
    assert train_y.shape[1:] == (3,) and set(np.unique(train_y)) <= {0.0, 1.0}
    assert (val_y.sum(axis=0) > 0).all()  # every label is in validation
    np.testing.assert_array_equal(examples.train_label_counts, train_y.sum(axis=0))
    with pytest.raises(ValueError, match=r"several labels per image need "
                                         r"--config.task=multi_label; if each cell"):
        tables.read_file(str(table), tables.settings())
    config = tiny_config(tmp_path, dataset=str(tmp_path / "images"), task="multi_label")
    with pytest.raises(ValueError, match=r"^task=multi_label needs several labels per image, "
                                         r"from a label table \(.csv, .tsv\) or arrays"):
        data.load_examples(config)  # a folder: one class per image


@pytest.fixture(scope="module")
def multi_label_run(tmp_path_factory):
    """large_similar on a multi-label table: a head on cached features, then `fit` with
    mixup, each label's positives weighted (class_weight=balanced); its config and
    metrics.json."""
    root = tmp_path_factory.mktemp("multi_label")
    table, _ = write_multi_label_table(root / "images")
    config = tiny_config(root, "large_similar", task="multi_label", dataset=str(table),
                         batch_augment="mixup", class_weight="balanced")
    return config, train.finetune(config, data.load(config, image_size=config.image_size))


def test_multi_label_trains_sigmoids_on_cached_features_and_with_fit(multi_label_run):
    config, metrics = multi_label_run
    assert metrics["task"] == "multi_label"
    assert metrics["train_path"] == {"head": "cached_features", "finetune": "fit"}
    counts = data.load(config, image_size=config.image_size).train_label_counts
    assert metrics["class_weight"] == {  # images without a label over images with it
        name: round((metrics["train_examples"] - n) / n, 4)
        for name, n in zip(["cat", "dog", "fox"], counts)}
    # Were "softmax" or "val_accuracy" still assumed anywhere on the way, this run would
    # build a softmax head, or find no val_mAP to keep best.keras by, record and draw.
    assert 0 <= metrics["val_mAP"] <= 1 and "val_accuracy" not in metrics
    assert metrics["best_val_mAP"] == max(
        float(row["val_mAP"]) for row in _history(config.workdir))
    assert os.path.exists(os.path.join(config.workdir, "best.keras"))  # kept by val_mAP
    with open(os.path.join(config.workdir, "config.json")) as f:
        assert json.load(f)["task"] == "multi_label"
    with open(os.path.join(config.workdir, "report.html")) as f:
        assert '<p class="big">val_mAP ' in f.read()
    assert os.path.exists(os.path.join(config.workdir, "curves.png"))
    model = keras.models.load_model(os.path.join(config.workdir, "model.keras"))
    assert model.get_layer("predictions").activation.__name__ == "sigmoid"
    out = model.predict(np.zeros((2, 32, 32, 3), "float32"), verbose=0)
    assert out.shape == (2, 3) and not np.allclose(out.sum(axis=1), 1)
    found = predict.from_run(config.workdir)
    assert found.task is tasks.MULTI_LABEL
    files = [os.path.join(os.path.dirname(config.dataset), "cat", f) for f in ("0.png", "1.jpg")]
    rows, _ = predict.predict_files(found, files)  # every label at 0.5 or above, no top-k
    cut = found.thresholds or [0.5] * 3  # tools/evaluate.py's, once it has chosen them
    for row, p in zip(rows, found.probabilities(files)):
        assert row[1::2] == [found.class_names[c] for c in np.argsort(-p, kind="stable")
                             if p[c] >= cut[c]]


def test_evaluate_scores_a_multi_label_run_and_predict_decides_by_its_thresholds(
        multi_label_run):
    from sklearn.metrics import average_precision_score, f1_score

    config, _ = multi_label_run
    result = evaluate.evaluate_run(config.workdir)
    model = keras.models.load_model(os.path.join(config.workdir, "model.keras"))
    pairs = list(data.load(config, config.image_size).val.unbatch().as_numpy_iterator())
    p = model.predict(np.stack([x for x, _ in pairs]), verbose=0)
    truth = np.stack([y for _, y in pairs]) > 0.5
    held = [c for c in range(3) if truth[:, c].any()]
    assert result["images"] == len(pairs) and result["labels_scored"] == len(held)
    assert result["mAP"] == pytest.approx(
        np.mean([average_precision_score(truth[:, c], p[:, c]) for c in held]), abs=1e-6)
    assert result["micro_f1"] == pytest.approx(f1_score(truth, p >= 0.5, average="micro"))
    names = ["cat", "dog", "fox"]
    # The thresholds are cuts of evaluate's own probabilities (the folded graph's, equal
    # to predict's within 1e-6, which reorders the near-ties of a tiny model's outputs).
    from tl_keras import folded

    p, _ = evaluate.predict(folded.fold(model) if folded.usable() else model,
                            data.load(config, config.image_size).val)
    for c in held:  # each threshold: the best F1 any cut of these probabilities gives
        row = result["per_label"][names[c]]
        best = max(f1_score(truth[:, c], p[:, c] >= t) for t in p[:, c])
        assert row["f1"] == pytest.approx(best, abs=1e-6)
        assert row["f1"] == pytest.approx(f1_score(truth[:, c], p[:, c] >= row["threshold"]),
                                          abs=1e-6)
    saved = json.load(open(os.path.join(config.workdir, "eval", "thresholds.json")))
    assert saved == {name: result["per_label"][name]["threshold"] for name in names}
    assert predict.from_run(config.workdir).thresholds == [saved[name] for name in names]
    with open(os.path.join(config.workdir, "report.html")) as f:
        page = f.read()
    assert f"mAP ({len(held)} labels)" in page and "Per label" in page
    assert evaluate.format_summary(result).splitlines()[1].startswith(
        f"mAP {result['mAP']:.4f} ({len(held)} labels), micro-F1 ")


@pytest.mark.slow  # ~12 s: a SavedModel export (the single-label exports: fast)
def test_a_multi_label_saved_model_answers_probabilities_and_the_labels_at_their_thresholds(
        multi_label_run, tmp_path):
    import tensorflow as tf

    import shutil

    config, _ = multi_label_run
    run = tmp_path / "run"  # a copy: the shared run's own thresholds stay evaluate's
    shutil.copytree(config.workdir, run)
    os.makedirs(run / "eval", exist_ok=True)
    with open(run / "eval" / "thresholds.json", "w") as f:  # as tools/evaluate.py writes them
        json.dump({"cat": 0.3, "dog": 0.5, "fox": 0.7}, f)
    version = export.export_run(str(run), str(tmp_path / "exports"), verbose=False)
    with open(os.path.join(version, "assets.extra", "thresholds.txt")) as f:
        assert [float(line) for line in f] == [0.3, 0.5, 0.7]
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    expected = keras.models.load_model(os.path.join(config.workdir, "model.keras")).predict(
        pixels, verbose=0)
    out = tf.saved_model.load(version).signatures["serving_default"](images=tf.constant(pixels))
    assert set(out) == {"probabilities", "present"}
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(out["present"].numpy(), out["probabilities"].numpy()
                                  >= np.array([0.3, 0.5, 0.7], "float32"))
    found = predict.from_saved_model(str(tmp_path / "exports"))
    assert found.task is tasks.MULTI_LABEL and found.thresholds == [0.3, 0.5, 0.7]


@pytest.mark.slow  # ~20 s: an int8 conversion with calibration (the single-label ones: fast)
def test_litert_holds_a_multi_label_model_to_its_label_decisions_and_map(multi_label_run,
                                                                        tmp_path):
    from sklearn.metrics import average_precision_score

    config, _ = multi_label_run
    version, report = litert.export_run(config.workdir, str(tmp_path / "lite"), "int8",
                                        verbose=False, min_agreement=0, max_drop=1,
                                        float_fallback=False)
    thresholds = np.array(evaluate.run_thresholds(config.workdir, json.load(open(
        os.path.join(config.workdir, "metrics.json")))), "float32")
    with open(os.path.join(version, "thresholds.txt")) as f:
        np.testing.assert_array_equal([float(line) for line in f], thresholds)
    pairs = list(data.load(config, config.image_size).val.unbatch().as_numpy_iterator())
    images, labels = np.stack([x for x, _ in pairs]), np.stack([y for _, y in pairs]) > 0.5
    keras_p = keras.models.load_model(os.path.join(config.workdir, "model.keras")).predict(
        images, verbose=0)
    with open(os.path.join(version, "model.tflite"), "rb") as f:
        lite_p = litert.Runner(f.read())(images)
    held = labels.any(axis=0)
    assert report["decision_agreement"] == pytest.approx(
        ((keras_p >= thresholds) == (lite_p >= thresholds)).mean(), abs=1e-6)
    assert report["litert_mAP"] == pytest.approx(
        average_precision_score(labels[:, held], lite_p[:, held], average="macro"), abs=1e-6)
    assert report["keras_mAP"] == pytest.approx(
        average_precision_score(labels[:, held], keras_p[:, held], average="macro"), abs=1e-5)
    assert "top1_agreement" not in report and "keras_accuracy" not in report
