"""What a run learns to predict from an image: its task, resolved once into the plan.

    config.task --plan.resolve--> plan.task: Task
        the head's activation               model.build_classifier
        the loss and metrics                train.compile_phase, pilots
        the one monitored metric            best.keras, early stopping, the tuner's objective
        the labels' form                    data.py (sources), features.py (the cache)
        decoding a prediction               predict.py, the SavedModel's outputs
        scoring a finished run              evaluate.py, litert.Judge (the int8 guard)
        scoring held-out predictions        the advisor's pilots (`score`, bootstrapped)

Those modules read `plan.task` instead of assuming one label per image.

- `single_label`: one class per image: a softmax head, cross-entropy, accuracy; labels
  are class indices.
- `multi_label`: any number of labels per image (none, one, several): a sigmoid head,
  binary cross-entropy per label, judged by mAP; labels are 0/1 vectors over the
  classes; a prediction is every label whose probability reaches its threshold.

Example:
    task = get_task("single_label")
    model.compile(loss=task.loss(label_smoothing=0.1), metrics=task.metrics())
    task.decode(probabilities, class_names, top_k=3)  # per image: [(class, probability)]
"""

import dataclasses

import keras
import numpy as np

from tl_keras import losses, transferability


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: how the head ends, how it is trained and judged, how it is read."""

    name: str
    activation: str    # the head's Dense activation
    metric: str        # the metric `compile` reports, the one a run is judged on
    vector_labels: bool = False  # labels are 0/1 vectors over the classes, not indices

    @property
    def monitor(self):
        """The validation metric that picks best.keras, stops early and ranks tuner trials."""
        return f"val_{self.metric}"

    def loss(self, label_smoothing=0.0, soft=False, positive_weights=None):
        """What `compile` takes as the loss; `soft`: it also takes mixed labels (mixup,
        CutMix); `positive_weights`: multi-label's (single-label weighs classes in `fit`)."""
        return losses.crossentropy(label_smoothing, soft)

    def metrics(self, soft=False):
        """What `compile` takes as metrics, `self.metric` among them."""
        return losses.metrics(soft)

    def decode(self, probabilities, class_names, top_k=5, thresholds=None):
        """Per image, its `top_k` (class name, probability) pairs, most probable first
        (`thresholds`: multi-label's, unused)."""
        probabilities = np.asarray(probabilities)
        k = min(top_k, len(class_names))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [[(class_names[c], float(row[c])) for c in top]
                for row, top in zip(probabilities, order)]

    def score(self, probabilities, labels, weights=None):
        """`metric` of `probabilities` [N, classes] against `labels`, in numpy: a float;
        with `weights` [R, N] (R weightings of the images: a bootstrap's resample
        counts), one per weighting, [R]. Accuracy: the (weighted) share of images whose
        most probable class is their label."""
        correct = np.argmax(probabilities, axis=1) == np.asarray(labels).reshape(-1)
        if weights is None:
            return float(correct.mean())
        weights = np.asarray(weights, "float64")
        return weights @ correct / weights.sum(axis=1)


@dataclasses.dataclass(frozen=True)
class MultiLabel(Task):
    """Labels per image, each present or not: a sigmoid per class, binary cross-entropy,
    mAP (Keras' `AUC(curve="PR", multi_label=True)`: each label's area under its
    precision-recall curve, averaged over labels) and micro-averaged F1 at 0.5."""

    def loss(self, label_smoothing=0.0, soft=False, positive_weights=None):
        """Binary cross-entropy per label; it takes mixed (soft) labels as they are;
        `positive_weights`: one per label, on its positive term (class_weight=balanced)."""
        smoothing = losses.checked_smoothing(label_smoothing)
        if positive_weights is not None:
            return losses.WeightedBinaryCrossentropy(positive_weights, smoothing)
        if smoothing == 0:
            return "binary_crossentropy"  # stock Keras: model.keras loads anywhere
        return keras.losses.BinaryCrossentropy(label_smoothing=smoothing)

    def metrics(self, soft=False):
        return [keras.metrics.AUC(curve="PR", multi_label=True, name=self.metric),
                keras.metrics.F1Score(average="micro", threshold=THRESHOLD, name="micro_f1")]

    def decode(self, probabilities, class_names, top_k=None, thresholds=None):
        """Per image, its labels whose probability reaches their threshold (`thresholds`,
        one per class; default 0.5), most probable first: [(class name, probability)];
        every one of them (`top_k` is single-label's)."""
        probabilities = np.asarray(probabilities)
        cut = np.full(len(class_names), THRESHOLD) if thresholds is None else np.asarray(
            thresholds, "float64")
        order = np.argsort(-probabilities, axis=1, kind="stable")
        return [[(class_names[c], float(row[c])) for c in ranked if row[c] >= cut[c]]
                for row, ranked in zip(probabilities, order)]

    def score(self, probabilities, labels, weights=None):
        """mAP: each label's average precision (scikit-learn's), averaged over the labels
        the (weighted) images hold; see `Task.score`."""
        return transferability.mean_average_precision(probabilities, labels, weights)


THRESHOLD = 0.5  # a label is predicted at this probability unless thresholds say otherwise

# One class per image: a softmax head, cross-entropy, accuracy.
SINGLE_LABEL = Task("single_label", activation="softmax", metric="accuracy")
# Any number of labels per image: sigmoids, binary cross-entropy, mAP.
MULTI_LABEL = MultiLabel("multi_label", activation="sigmoid", metric="mAP",
                         vector_labels=True)

TASKS = {task.name: task for task in (SINGLE_LABEL, MULTI_LABEL)}
DEFAULT = SINGLE_LABEL.name


def get_task(name):
    """The `Task` called `name`; a one-line `ValueError` listing the tasks otherwise."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def of_run(metrics):
    """The `Task` of a finished run, from its metrics.json dict (runs before tasks
    existed were single-label)."""
    return get_task(metrics.get("task", DEFAULT))
