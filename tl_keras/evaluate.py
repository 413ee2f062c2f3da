"""Evaluation of a finished run: which classes fail, what the mistakes look like,
whether the probabilities can be trusted. (A multi-label run: mAP, micro and macro F1,
per label AP / precision / recall / F1 / support at a threshold chosen per label on
validation, kept in RUN/eval/thresholds.json for tools/predict.py; no pictures.)

    run folder (model.keras, config.json, metrics.json)
      + the validation split (or any dataset the tools take)
      -> probabilities, once (and once more on flipped images with tta="flip")
      -> RUN/eval/eval.json      accuracy, top-k, per-class precision / recall / F1,
                                 the most-confused pairs, expected calibration error
         RUN/eval/confusion.png  the confusion matrix, row-normalised, with counts
         RUN/eval/reliability.png  confidence against accuracy, per bin
         RUN/eval/mistakes.png   the most confident mistakes: image, true, predicted
      -> RUN/report.html again, with the evaluation

Per-class scores and the confusion matrix are scikit-learn's. Nothing else of
the run folder changes; each file is written whole. Example:

    result = evaluate_run("runs/small_similar_...", tta="flip")
    result["accuracy"], result["ece"]
"""

import os

import numpy as np

from tl_keras import (data, features, folded, model as model_lib, plan as plan_lib, report,
                      run_folder, tasks, transferability)

BINS = 15           # calibration bins, equal width in confidence (Guo et al. 2017)
MISTAKES = 16       # images in mistakes.png
TTA = ("none", "flip")


def load_run(workdir, which="model"):
    """(model, config, metrics) of a finished run; `which`: "model" (the final
    model, as metrics.json) or "best" (best.keras)."""
    if which not in ("model", "best"):
        raise ValueError(f"unknown model {which!r}; valid: model, best")
    paths = {name: os.path.join(workdir, name) for name in
             ("config.json", "metrics.json", f"{which}.keras")}
    missing = [name for name, path in paths.items() if not os.path.exists(path)]
    if missing:
        raise ValueError(f"workdir {workdir!r} holds no finished run ({', '.join(missing)} "
                         "missing); pass the run folder tools/finetune.py printed")
    model = model_lib.load_model(paths[f"{which}.keras"])
    return (model, run_folder.read_json(paths["config.json"]),
            run_folder.read_json(paths["metrics.json"]))


def evaluation_data(config, dataset=None, class_names=None, channels=None):
    """(pipeline of (images, labels) batches, its size, a description).

    Without `dataset`: the run's own validation split, as training read it.
    A folder: every image in it (class subfolders named as the run's classes).
    A built-in or `tfds:` dataset: its validation (or test) split. Images
    are converted to the model's `channels` (RGB -> grey as export.py does).
    """
    config = plan_lib.with_defaults(config)  # an older run's config.json lacks newer keys
    config.augment = False
    if dataset and os.path.isdir(dataset):
        examples = data.from_folder(dataset, val_fraction=0, seed=config.seed,
                                    strict=config.strict)
        pipelines = data.make_datasets(examples, config, config.image_size)
        source, n, described = pipelines.plain_train(), examples.train_examples, dataset
    else:
        if dataset:
            config.dataset = dataset
        config.max_examples = config.examples_per_class = 0
        pipelines = data.load(config, config.image_size)
        source, n = pipelines.val, pipelines.val_examples
        described = f"{config.dataset} (validation split)"
    if class_names is not None and list(pipelines.class_names) != list(class_names):
        raise ValueError(f"the dataset's classes {_few(pipelines.class_names)} are not the "
                         f"model's {_few(class_names)}")
    if channels and pipelines.channels != channels:
        import tensorflow as tf

        from tl_keras import export

        def convert(x, y):
            rgb = tf.image.grayscale_to_rgb(x) if x.shape[-1] == 1 else x[..., :3]
            x = export.to_model_channels(tf.cast(rgb, tf.float32), channels)
            return tf.cast(tf.round(x), tf.uint8), y

        source = source.map(convert)
    return source, n, described


def _few(names, shown=6):
    names = list(names)
    return "[" + ", ".join(names[:shown]) + (", ..." if len(names) > shown else "") + "]"


def predict(model, source, flip=False, verbose=0, batch_size=features.INFERENCE_BATCH):
    """(probabilities [N, C], labels [N] or label vectors [N, C]) over `source`, in its order,
    in batches of `batch_size`; on a CPU through the folded graph (folded.py).
    `model`: a Keras model, or `folded.fold(model)` for several passes."""
    import tensorflow as tf

    source = features.rebatch(source, batch_size)
    if flip:
        source = source.map(lambda x, y: (tf.image.flip_left_right(x), y))
    probabilities, labels = folded.predict(model, source, verbose=verbose)
    if labels.ndim == 2:  # label vectors (task=multi_label)
        return np.asarray(probabilities, "float64"), labels
    return np.asarray(probabilities, "float64"), labels.reshape(-1).astype("int64")


def calibration(probabilities, labels, bins=BINS):
    """(expected calibration error, per-bin rows): the top-1 confidence split into
    `bins` equal-width bins; ECE = sum over bins of |accuracy - confidence| x share."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if not inside.any():
            continue
        accuracy, mean_confidence = correct[inside].mean(), confidence[inside].mean()
        ece += abs(accuracy - mean_confidence) * inside.mean()
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]),
                     "images": int(inside.sum()), "accuracy": float(accuracy),
                     "confidence": float(mean_confidence)})
    return float(ece), rows


def scores(probabilities, labels, class_names, top_k=5):
    """Everything eval.json holds but the dataset's description."""
    from sklearn import metrics as skm

    num_classes = len(class_names)
    predicted = probabilities.argmax(axis=1)
    k = min(top_k, num_classes)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=range(num_classes), zero_division=0)
    matrix = skm.confusion_matrix(labels, predicted, labels=range(num_classes))
    off = [(int(matrix[t, p]), t, p) for t in range(num_classes) for p in range(num_classes)
           if t != p and matrix[t, p]]
    ece, bins = calibration(probabilities, labels)
    return {
        "images": int(len(labels)),
        "accuracy": float((predicted == labels).mean()),
        "top_k": k,
        "top_k_accuracy": float((np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
                                 == labels[:, None]).any(axis=1).mean()),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(class_names)},
        "most_confused": [{"true": class_names[t], "predicted": class_names[p], "count": c}
                          for c, t, p in sorted(off, key=lambda r: -r[0])[:10]],
        "confusion_matrix": matrix.tolist(),
        "ece": ece,
        "calibration_bins": bins,
    }


def worst_mistakes(probabilities, labels, n=MISTAKES):
    """Indices of the `n` wrong predictions made with the highest confidence."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:n]


def images_at(source, indices):
    """{index: image} of the pipeline's images at `indices` (one more read, same order)."""
    wanted, out, i = set(int(j) for j in indices), {}, 0
    for x, _ in source:
        x = np.asarray(x)
        for j in range(len(x)):
            if i + j in wanted:
                out[i + j] = x[j]
        i += len(x)
        if len(out) == len(wanted):
            break
    return out


# --- Pictures ------------------------------------------------------------------------

def plot_confusion(matrix, class_names, path):
    plt = report.pyplot()
    matrix = np.asarray(matrix)
    n = len(class_names)
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(max(4.0, 0.45 * n + 2), 14)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 25:
        for t in range(n):
            for p in range(n):
                if matrix[t, p]:
                    ax.text(p, t, f"{matrix[t, p]}", ha="center", va="center", fontsize=6,
                            color="white" if normalised[t, p] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set_title("Confusion matrix (colour: row-normalised; numbers: images)", fontsize=9)
    fig.tight_layout()
    return report.save_figure(fig, path)


def plot_reliability(bins, ece, path):
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=100)
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    ax.bar(centres, [b["accuracy"] for b in bins], width=width * 0.9, color="#4a7fb5",
           label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(centres, [b["confidence"] for b in bins], "o", color="#e8743b", markersize=3,
            label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability: ECE {ece:.3f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return report.save_figure(fig, path)


def plot_mistakes(images, rows, path):
    """A grid of `images` ({index: image}) titled by `rows` (true, predicted, probability)."""
    plt = report.pyplot()
    n = len(rows)
    columns = min(n, 4) or 1
    lines = -(-n // columns) or 1
    fig, axes = plt.subplots(lines, columns, figsize=(2.3 * columns, 2.5 * lines), dpi=100,
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), rows):
        image = images[row["index"]]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image[..., :3],
                  cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
        ax.set_title(f"true {row['true']}\npredicted {row['predicted']} "
                     f"({row['probability']:.2f})", fontsize=7)
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("The most confident mistakes", fontsize=9)
    fig.tight_layout()
    return report.save_figure(fig, path)


# --- The whole evaluation -----------------------------------------------------------

def evaluate_run(workdir, dataset=None, tta="none", top_k=5, which="model", verbose=0):
    """Evaluates a finished run; writes RUN/eval/ and RUN/report.html; returns eval.json's dict.
    `verbose` 1: a progress bar per pass over the images."""
    if tta not in TTA:
        raise ValueError(f"unknown tta {tta!r}; valid: {', '.join(TTA)}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    model, config, metrics = load_run(workdir, which)
    class_names = metrics["class_names"]
    multi_label = tasks.of_run(metrics).vector_labels
    if multi_label and dataset and os.path.isdir(dataset):
        raise ValueError(f"a multi-label run is evaluated on a label table (.csv, .tsv) or its "
                         f"own validation split; {dataset!r} is a folder of one class per image")
    source, n, described = evaluation_data(config, dataset, class_names,
                                           channels=model.input.shape[-1])
    if verbose:
        print(f"Evaluating {which}.keras on {described}: {n} images")
    # Folded once for both passes of flip TTA (on a CPU; else Keras' predict).
    run = folded.fold(model) if folded.usable() else model
    probabilities, labels = predict(run, source, verbose=verbose)
    if len(labels) != n:
        raise ValueError(f"the dataset gave {len(labels)} images, expected {n}")
    if multi_label:
        return _evaluate_labels(workdir, run, source, probabilities, labels, class_names,
                                {"dataset": described, "model": f"{which}.keras"}, tta,
                                own_split=not dataset and which == "model", verbose=verbose)
    result = {"dataset": described, "model": f"{which}.keras",
              **scores(probabilities, labels, class_names, top_k)}
    if tta == "flip":
        flipped, _ = predict(run, source, flip=True, verbose=verbose)
        averaged = (probabilities + flipped) / 2
        ece, _ = calibration(averaged, labels)
        result["tta"] = {"kind": "horizontal flip", "accuracy": float(
            (averaged.argmax(axis=1) == labels).mean()), "ece": ece}
    folder = os.path.join(workdir, "eval")
    os.makedirs(folder, exist_ok=True)
    worst = worst_mistakes(probabilities, labels)
    rows = [{"index": int(i), "true": class_names[labels[i]],
             "predicted": class_names[int(probabilities[i].argmax())],
             "probability": float(probabilities[i].max())} for i in worst]
    result["mistakes"] = rows
    plot_confusion(result["confusion_matrix"], class_names,
                   os.path.join(folder, "confusion.png"))
    plot_reliability(result["calibration_bins"], result["ece"],
                     os.path.join(folder, "reliability.png"))
    plot_mistakes(images_at(source, worst), rows, os.path.join(folder, "mistakes.png"))
    run_folder.write_json(os.path.join(folder, "eval.json"), result)
    report.write_report(workdir)
    return result


def format_summary(result):
    """The lines tools/evaluate.py prints."""
    if "mAP" in result:
        return _format_labels(result)
    lines = [f"{result['dataset']}: {result['images']} images",
             f"accuracy {result['accuracy']:.4f}, top-{result['top_k']} "
             f"{result['top_k_accuracy']:.4f}, expected calibration error {result['ece']:.4f}"]
    if "tta" in result:
        lines.append(f"with {result['tta']['kind']} TTA: accuracy {result['tta']['accuracy']:.4f},"
                     f" ECE {result['tta']['ece']:.4f}")
    worst = sorted(result["per_class"].items(), key=lambda kv: kv[1]["f1"])[:3]
    lines.append("lowest F1: " + ", ".join(f"{c} {r['f1']:.3f}" for c, r in worst))
    if result["most_confused"]:
        top = result["most_confused"][0]
        lines.append(f"most confused: {top['true']} taken for {top['predicted']} "
                     f"({top['count']} images)")
    return "\n".join(lines)


# --- Several labels per image (task=multi_label) --------------------------------------

def _evaluate_labels(workdir, run, source, probabilities, labels, class_names, result, tta,
                     own_split, verbose):
    """eval.json of a multi-label run (`label_scores`); with model.keras on the run's own
    validation split also eval/thresholds.json, which tools/predict.py then decides by."""
    thresholds = best_thresholds(probabilities, labels)
    result.update(label_scores(probabilities, labels, class_names, thresholds))
    if tta == "flip":
        flipped, _ = predict(run, source, flip=True, verbose=verbose)
        averaged = label_scores((probabilities + flipped) / 2, labels, class_names, thresholds)
        result["tta"] = {"kind": "horizontal flip", "mAP": averaged["mAP"],
                         "micro_f1": averaged["micro_f1"]}
    folder = os.path.join(workdir, "eval")
    os.makedirs(folder, exist_ok=True)
    if own_split:
        run_folder.write_json(os.path.join(folder, THRESHOLDS), dict(zip(
            class_names, map(float, thresholds))))
    run_folder.write_json(os.path.join(folder, "eval.json"), result)
    report.write_report(workdir)
    return result


THRESHOLDS = "thresholds.json"  # RUN/eval/: {label: threshold}, chosen on validation


def run_thresholds(workdir, metrics):
    """A multi-label run's per-class thresholds: those `evaluate_run` chose on its
    validation split (RUN/eval/thresholds.json), else 0.5 each; None for a single-label run."""
    if not tasks.of_run(metrics).vector_labels:
        return None
    path = os.path.join(workdir, "eval", THRESHOLDS)
    saved = run_folder.read_json(path) if os.path.exists(path) else {}
    return [float(saved.get(name, tasks.THRESHOLD)) for name in metrics["class_names"]]


def best_thresholds(probabilities, labels):
    """Per label, the probability at or above which it is predicted that gives the best F1
    on these images (0.5 for a label none of them holds)."""
    from sklearn import metrics as skm

    out = np.full(labels.shape[1], tasks.THRESHOLD)
    for c in range(labels.shape[1]):
        truth = labels[:, c] > 0.5
        if truth.any():
            precision, recall, cuts = skm.precision_recall_curve(truth, probabilities[:, c])
            f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
            out[c] = cuts[int(np.argmax(f1[:-1]))]
    return out


def average_precisions(probabilities, labels):
    """Each label's average precision (scikit-learn's, as `transferability` computes it),
    None for a label none of these images holds."""
    ap = transferability.average_precisions(probabilities, labels)
    return [None if np.isnan(a) else float(a) for a in ap]


def mean_average_precision(ap):
    """mAP: the mean of `average_precisions` over the labels the images hold."""
    return float(np.mean([a for a in ap if a is not None]))


def label_scores(probabilities, labels, class_names, thresholds):
    """mAP (the mean of each label's average precision, over the labels these images
    hold), micro and macro F1 at 0.5 and at `thresholds`, and per label: AP, threshold,
    precision, recall and F1 at it, and images holding it (support)."""
    from sklearn import metrics as skm

    truth = labels > 0.5
    held = truth.any(axis=0)
    ap = average_precisions(probabilities, labels)
    chosen = probabilities >= np.asarray(thresholds)[None, :]
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        truth, chosen, zero_division=0)

    def f1_at(decisions, average):
        return float(skm.f1_score(truth, decisions, average=average, zero_division=0))

    return {
        "images": int(len(labels)),
        "mAP": mean_average_precision(ap),
        "labels_scored": int(held.sum()),
        "micro_f1": f1_at(probabilities >= tasks.THRESHOLD, "micro"),
        "macro_f1": f1_at(probabilities >= tasks.THRESHOLD, "macro"),
        "micro_f1_at_thresholds": f1_at(chosen, "micro"),
        "macro_f1_at_thresholds": f1_at(chosen, "macro"),
        "per_label": {name: {"ap": ap[c], "threshold": float(thresholds[c]),
                             "precision": float(precision[c]), "recall": float(recall[c]),
                             "f1": float(f1[c]), "support": int(support[c])}
                      for c, name in enumerate(class_names)},
    }


def _format_labels(result):
    lines = [f"{result['dataset']}: {result['images']} images",
             f"mAP {result['mAP']:.4f} ({result['labels_scored']} labels), micro-F1 "
             f"{result['micro_f1']:.4f} at 0.5, {result['micro_f1_at_thresholds']:.4f} at the "
             "per-label thresholds"]
    if "tta" in result:
        lines.append(f"with {result['tta']['kind']} TTA: mAP {result['tta']['mAP']:.4f}, "
                     f"micro-F1 {result['tta']['micro_f1']:.4f}")
    scored = [(c, r) for c, r in result["per_label"].items() if r["ap"] is not None]
    worst = sorted(scored, key=lambda kv: kv[1]["ap"])[:3]
    lines.append("lowest AP: " + ", ".join(f"{c} {r['ap']:.3f}" for c, r in worst))
    return "\n".join(lines)
