"""What a run learns to predict from an image: its task, resolved once into the plan.

    config.task --plan.resolve--> plan.task: Task
        the head's activation               model.build_classifier
        the loss and metrics                train.compile_phase, pilots
        the one monitored metric            best.keras, early stopping, the tuner's objective
        decoding a prediction               predict.py
    (The labels in the pipeline and the feature cache, the advisor's scores and
    pilots, and evaluate.py's report are still single-label code.)

Those modules read `plan.task` instead of assuming one label per image. Today's task
is `single_label`: one class per image, a softmax head, cross-entropy, accuracy.

Example:
    task = get_task("single_label")
    model.compile(loss=task.loss(label_smoothing=0.1), metrics=task.metrics())
    task.decode(probabilities, class_names, top_k=3)  # per image: [(class, probability)]
"""

import dataclasses

import numpy as np

from tl_keras import losses


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: how the head ends, how it is trained and judged, how it is read."""

    name: str
    activation: str    # the head's Dense activation
    metric: str        # the metric `compile` reports, the one a run is judged on

    @property
    def monitor(self):
        """The validation metric that picks best.keras, stops early and ranks tuner trials."""
        return f"val_{self.metric}"

    def loss(self, label_smoothing=0.0, soft=False):
        """What `compile` takes as the loss; `soft`: it also takes mixed labels (mixup,
        CutMix)."""
        return losses.crossentropy(label_smoothing, soft)

    def metrics(self, soft=False):
        """What `compile` takes as metrics, `self.metric` among them."""
        return losses.metrics(soft)

    def decode(self, probabilities, class_names, top_k=5):
        """Per image, its `top_k` (class name, probability) pairs, most probable first."""
        probabilities = np.asarray(probabilities)
        k = min(top_k, len(class_names))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [[(class_names[c], float(row[c])) for c in top]
                for row, top in zip(probabilities, order)]


# One class per image: a softmax head, cross-entropy, accuracy.
SINGLE_LABEL = Task("single_label", activation="softmax", metric="accuracy")

TASKS = {task.name: task for task in (SINGLE_LABEL,)}
DEFAULT = SINGLE_LABEL.name


def get_task(name):
    """The `Task` called `name`; a one-line `ValueError` listing the tasks otherwise."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]
