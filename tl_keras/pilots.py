"""The regime advisor's pilot runs: what the scores cannot see, measured.

After the scores' decision (advise.measure), short real runs on the advisor's
sample, scored on held-out images of it: a frozen head at every cut (on the
sample's features: no forward pass), then a short fine-tuned run at the frozen
choice's cut and, on large data, a short run from scratch. Another strategy
replaces the scores' and the table's choice only when its pilot beats that
choice's pilot outside the held-out images' noise (a paired bootstrap's 95%
lower bound above 0, and above `Thresholds.costlier_margin` for a strategy that
trains more: a tie goes to the cheaper; `decide_by_pilots`). A trained pilot
that could not change the decision even with a perfect score is not run
(`cannot_change`). Pilots are scored by the task's metric (`Task.score`:
accuracy, or mAP with several labels per image). The trained
pilots are real tl_keras runs (`train.finetune`), which is why this module sits
above train.py.

Example:
    advice, sample = advise(plan, datasets, pilots=PilotSettings())
    advice.decided_by, advice.pilots
"""

import contextlib
import dataclasses
import io
import os
import tempfile
import time

import keras
import numpy as np

from tl_keras import (advise as advise_lib, arrays, backbones, features as features_lib,
                      folded, keras_internals, plan as plan_lib, tasks, train as train_lib)
from tl_keras.advise import SAMPLE, Thresholds, pool_grid_for


def advise(plan, data, sample=SAMPLE, thresholds=Thresholds(), cuts=backbones.CUT_POINTS,
           verbose=1, pilots=None):
    """The regime advisor whole: `advise.measure`'s scores and decision, then, with
    `pilots` (`PilotSettings`; None: the scores alone) and pretrained weights to
    compare with, the pilots' decision. Returns (`advise.Advice`, `advise.Sample`)."""
    start = time.time()
    runs = pilots is not None and advise_lib.scored_weights(plan) != "none"
    advice, measured = advise_lib.measure(plan, data, sample, thresholds, cuts, verbose,
                                          keep_images=runs)
    if not runs:
        return advice, measured
    scratch = pilots.runs_scratch(advice.size)
    print("Pilot runs on the sample: a frozen head at each cut, then short runs "
          f"fine-tuned{' and from scratch' if scratch else ''}", flush=True)
    train_examples = int(data.train_examples)
    ran, sizes = run_pilots(plan.config, measured, data.class_names, train_examples, pilots,
                            [c for c in advice.scores if "pretrained" in advice.scores[c]],
                            advice.cut, scratch=scratch,
                            margin=thresholds.costlier_margin if advice.size == "small" else None)
    regime, cut, init, size, similarity, reasons = decide_by_pilots(
        ran, advice.cut, train_examples, sizes, thresholds, plan.config.seed)
    metric = plan.task.metric
    return dataclasses.replace(
        advice, regime=regime, cut=cut, init=init, pool_grid=pool_grid_for(cut), size=size,
        similarity=similarity, reasons=reasons, seconds=round(time.time() - start, 2),
        pilots={name: {metric: round(p.score, 4), "seconds": round(p.seconds, 1)}
                for name, p in ran.items()},
        pilot_images=dict(sizes), decided_by="pilots", metric=metric), measured


PILOT_BATCH = 16     # a pilot's batch at most: a short run on a sample takes enough steps
HEAD_EPOCHS = 20     # a frozen pilot's head trains at least this long (configs/small_*.py's)
BOOTSTRAP = 1000     # resamples of the held-out images for a pilot's noise
CONFIDENCE = 0.95    # a pilot beats another when its gain's one-sided lower bound is above 0
COST = {"frozen": 0, "finetuned": 1, "scratch": 1}  # what its full run trains: the head;
                                                    # the backbone too


@dataclasses.dataclass(frozen=True)
class PilotSettings:
    """How long the pilots train and what they are scored on (configs/base.py's
    `advisor.pilot_*` keys, whose defaults these are)."""
    passes: float = 2.0       # a trained pilot trains on this many training sets' worth of images
    max_epochs: int = 10      # ... but at most this many epochs of its pilot-train images
    held_out: float = 0.3     # of the sample, stratified by seed: what the pilots are scored on
    scratch: str = "large"    # a from-scratch pilot: on large data | always | never

    @classmethod
    def from_config(cls, advisor):
        """The pilots `config.advisor` asks for; None when `advisor.pilots` is off."""
        if not advisor.pilots:
            return None
        return cls(passes=float(advisor.pilot_passes), max_epochs=int(advisor.pilot_epochs),
                   held_out=float(advisor.pilot_held_out), scratch=str(advisor.scratch_pilot))

    def runs_scratch(self, size):
        """Whether a from-scratch pilot runs for data of `size` (small | large). By default
        on large data only: on small data the table trains no backbone, and within the
        pilots' budget a from-scratch run stays far below what it reaches in a full run
        while it costs the most (docs/advisor.md)."""
        return self.scratch == "always" or (self.scratch == "large" and size == "large")

    def epochs(self, train_examples, pilot_train):
        """Epochs of a trained pilot on `pilot_train` images for a dataset of
        `train_examples`: `passes` x the training set in images, 1 to `max_epochs`.
        A large run trains (epochs - head_epochs) passes through the backbone (8 by
        configs/base.py): on small data the fine-tuned pilot costs about a quarter of
        one such run; on large data, where it is capped, far less."""
        return int(min(self.max_epochs, max(1, round(self.passes * train_examples / pilot_train))))


@dataclasses.dataclass
class Pilot:
    """One pilot: a strategy trained on the pilot-train images, scored on the held-out ones."""
    strategy: str               # frozen | finetuned | scratch
    cut: str
    probabilities: np.ndarray   # [held-out images, classes]: what the pilot predicts
    labels: np.ndarray          # the held-out images' labels (class indices or vectors)
    task: tasks.Task            # what scores it (`Task.score`: accuracy | mAP)
    seconds: float
    head: list = None           # a frozen pilot's Dense weights: the fine-tuned pilot starts there

    @property
    def name(self):
        return "scratch" if self.strategy == "scratch" else f"{self.strategy}@{self.cut}"

    @property
    def score(self):
        """The task's metric on the held-out images."""
        return self.task.score(self.probabilities, self.labels)

    def scores(self, weights):
        """The metric under each weighting of the held-out images, [R] for `weights` [R, N]."""
        return self.task.score(self.probabilities, self.labels, weights)


def pilot_split(labels, held_out, seed):
    """(pilot-train, held-out) indices of the sample: stratified (by class; by each
    image's rarest label, of label vectors), seeded."""
    return arrays.split_indices(arrays.strata(labels), held_out, seed=seed)


def frozen_pilot(features, labels, split, config, num_classes):
    """`frozen_pilots` of one cut's features: (probabilities [held-out], Dense weights)."""
    return frozen_pilots({"cut": features}, labels, split, config, num_classes)["cut"]


def frozen_pilots(features, labels, split, config, num_classes):
    """A new head on each cut's frozen features ({cut: [N, D]}, the sample's: no forward
    pass), trained as a run's head phase trains (standardised, dropout, AdamW at
    `learning_rate`; the run's `epochs`, at least `HEAD_EPOCHS`: a large run's few epochs
    are few steps on a sample), scored on the held-out images.

    The heads train side by side in one Keras model, one `fit`: each has its own
    weights and its own loss (their sum's gradient for a head is its loss's, and
    AdamW steps each weight by its own moments), so each trains as it would alone,
    on the same batches (but for its initial weights and dropout draws), while the
    steps' fixed cost and the tracing are paid once; its epochs are one pass of
    `fit` (`_Epochs`), so Keras' cost per epoch is paid once too.
    Returns {cut: (probabilities [held-out], Dense weights)}."""
    train, held = split
    task = tasks.get_task(config.task)
    keras.utils.set_random_seed(config.seed)
    inputs, outputs = [], []
    for i, values in enumerate(features.values()):
        mean, variance = features_lib.norm_statistics(values[train])
        inputs.append(keras.Input(values.shape[1:], name=f"features_{i}"))
        x = keras.layers.Normalization(mean=mean, variance=variance)(inputs[-1])
        x = keras.layers.Dropout(config.dropout, seed=config.seed)(x)
        outputs.append(keras.layers.Dense(num_classes, activation=task.activation,
                                          name=f"head_{i}")(x))
    heads = keras.Model(inputs, outputs)
    heads.compile(keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay),
                  [task.loss()] * len(outputs),
                  steps_per_execution=config.head_steps_per_execution)
    epochs = _Epochs([values[train] for values in features.values()], labels[train],
                     min(config.batch_size, PILOT_BATCH), max(config.epochs, HEAD_EPOCHS),
                     config.seed)
    keras_internals.build_before_tracing(heads, epochs)  # one trace of the step
    heads.fit(epochs, verbose=0)
    # A call, not `predict`: predict's function would be traced for this one use.
    probabilities = heads([values[held] for values in features.values()])
    if len(outputs) == 1:  # a one-output model gives its tensor, not a list of one
        probabilities = [probabilities]
    return {cut: (keras.ops.convert_to_numpy(p), heads.get_layer(f"head_{i}").get_weights())
            for i, (cut, p) in enumerate(zip(features, probabilities))}


class _Epochs(keras.utils.PyDataset):
    """`epochs` passes over (inputs, labels) in batches, each pass in its own seeded
    order, as one epoch of `fit`: batches as `fit(..., epochs=epochs, shuffle=True)`
    makes them (its last of each pass smaller), without `fit`'s cost per epoch (a new
    iterator, callbacks: ~75 ms on 2 cores, more than a head's pass over a sample's
    features)."""

    def __init__(self, inputs, labels, batch_size, epochs, seed):
        super().__init__()
        self.inputs, self.labels = inputs, labels
        rng = np.random.default_rng(seed)
        self.batches = [order[i:i + batch_size] for order in
                        (rng.permutation(len(labels)) for _ in range(epochs))
                        for i in range(0, len(labels), batch_size)]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        idx = self.batches[i]
        return tuple(x[idx] for x in self.inputs), (self.labels[idx],) * len(self.inputs)


def pilot_config(config, strategy, cut, epochs):
    """The config of a short real run of `strategy` ("finetuned" at `cut`, or "scratch"):
    the caller's config (its recipe and rates) for `epochs`, without augmentation (as
    the frozen pilots' features), one device, quiet. The fine-tuned pilot has no head
    phase: its head starts as the frozen pilot's at that cut ended."""
    config = plan_lib.editable(config)
    config.update(epochs=epochs, batch_size=min(config.batch_size, PILOT_BATCH), verbose="0",
                  report=False, validation_freq=epochs + 1, early_stopping=0, augment=False,
                  cached_views=1, distribution="none", workdir="")
    if strategy == "finetuned":
        config.update(regime="large_similar" if cut == "top" else "large_different", cut=cut,
                      init="pretrained", pool_grid=pool_grid_for(cut), head_epochs=0)
    else:
        config.update(regime="large_different", cut="top", init="scratch", pool_grid=1)
    return config


def trained_pilot(config, sample, split, class_names, strategy, cut, epochs, head=None):
    """A real tl_keras run (`train.finetune`) of `strategy` on the pilot-train images, in a
    temporary folder, its head starting from `head` (Dense weights) when given; returns
    its probabilities on the held-out images."""
    from tl_keras import data as data_lib  # TensorFlow: only when a pilot trains

    config = pilot_config(config, strategy, cut, epochs)
    train_idx, held = split
    images, labels = sample.images, sample.labels
    examples = data_lib.from_arrays(images[train_idx], labels[train_idx], class_names,
                                    x_val=images[held], y_val=labels[held], seed=config.seed)
    with tempfile.TemporaryDirectory(prefix="tl_keras_pilot_") as folder:
        config.workdir = os.path.join(folder, "run")
        plan = plan_lib.resolve(config)
        datasets = data_lib.make_datasets(examples, plan.config, plan.image_size)
        keras.utils.set_random_seed(plan.config.seed)  # as train.finetune before it builds
        model, _ = train_lib.build(plan, len(class_names), datasets.channels)
        if head is not None:
            model.get_layer(features_lib.HEAD_LAYERS[-1]).set_weights(head)
        # feature_norm's statistics from the sample's features at the cut (those the
        # frozen head trained on), not from another pass over the images.
        first_view = ((sample.features[f"pretrained/{cut}"][train_idx], labels[train_idx])
                      if strategy == "finetuned" else None)
        with contextlib.redirect_stdout(io.StringIO()):
            train_lib.finetune(plan, datasets, model=model, save_models=False,
                               first_view=first_view)
    probabilities, _ = folded.predict(model, (images[held], labels[held]),
                                      features_lib.INFERENCE_BATCH)
    return np.asarray(probabilities)


def run_pilots(config, sample, class_names, train_examples, settings, cuts, scored_cut,
               scratch=True, verbose=1, margin=None):
    """The pilots: a frozen head at every cut in `cuts` (cheap: the sample's features),
    then short runs fine-tuned at the frozen choice's cut (`frozen_choice`: the scores'
    `scored_cut` unless a pilot beats it) and, with `scratch`, from scratch, for
    `settings.epochs(...)` epochs. One progress line each.

    With `margin` (small data: the table's choice is the frozen head), a trained
    pilot runs only if a perfect score could beat the frozen choice by `margin`
    at the 95% lower bound (`cannot_change`); else it is named in "not_run".
    Returns (pilots by name, {"train", "held_out", "epochs"[, "not_run"]})."""
    split = pilot_split(sample.labels, settings.held_out, config.seed)
    held_labels = sample.labels[split[1]]
    task = tasks.get_task(config.task)
    epochs = settings.epochs(train_examples, len(split[0]))
    trained = [("finetuned", None)] + ([("scratch", "top")] if scratch else [])
    total = len(cuts) + len(trained)
    pilots = {}

    def done(pilot):
        pilots[pilot.name] = pilot
        if verbose:
            print(f"Pilot {len(pilots)}/{total}: {pilot.name:<18} held-out {task.metric} "
                  f"{pilot.score:.3f} ({pilot.seconds:.0f} s)", flush=True)

    start = time.time()
    heads = frozen_pilots({cut: sample.features[f"pretrained/{cut}"] for cut in cuts},
                          sample.labels, split, config, len(class_names))
    share = (time.time() - start) / max(1, len(cuts))  # trained together: an equal share each
    for cut, (probabilities, head) in heads.items():
        done(Pilot("frozen", cut, probabilities, held_labels, task, share, head))
    frozen = frozen_choice(pilots, scored_cut, config.seed)
    sizes = {"train": len(split[0]), "held_out": len(split[1]), "epochs": epochs}
    for strategy, cut in trained:
        cut, head = (frozen.cut, frozen.head) if strategy == "finetuned" else (cut, None)
        name = "scratch" if strategy == "scratch" else f"{strategy}@{cut}"
        if margin is not None and cannot_change(frozen, margin, config.seed):
            sizes.setdefault("not_run", []).append(name)
            if verbose:
                print(f"Pilot {len(pilots) + len(sizes['not_run'])}/{total}: {name:<18} not "
                      f"run: a perfect score would not beat {frozen.name} "
                      f"({frozen.score:.3f}) by {100 * margin:.1f} points outside noise",
                      flush=True)
            continue
        start = time.time()
        probabilities = trained_pilot(config, sample, split, class_names, strategy, cut,
                                      epochs, head)
        done(Pilot(strategy, "" if strategy == "scratch" else cut, probabilities, held_labels,
                   task, time.time() - start))
    return pilots, sizes


def cannot_change(choice, margin, seed=0):
    """Whether no pilot could beat `choice` by `margin` at the 95% lower bound: not
    even one that scores every held-out image perfectly (so training one would cost
    time and change nothing)."""
    perfect = (choice.labels.astype("float32") if choice.task.vector_labels else
               np.eye(choice.probabilities.shape[1], dtype="float32")[choice.labels])
    best = dataclasses.replace(choice, strategy="perfect", probabilities=perfect)
    return lower_bound(best, choice, seed) <= margin


def lower_bound(a, b, seed=0, resamples=BOOTSTRAP, confidence=CONFIDENCE):
    """The one-sided `confidence` lower bound of pilot `a`'s score minus pilot `b`'s:
    a paired bootstrap over the held-out images both were scored on (each resample
    scores both pilots on the same images, as resample counts: weights)."""
    n = len(a.labels)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n, (resamples, n)) + n * np.arange(resamples)[:, None]
    weights = np.bincount(drawn.ravel(), minlength=resamples * n).reshape(resamples, n)
    return float(np.quantile(a.scores(weights) - b.scores(weights), 1 - confidence))


def frozen_choice(pilots, scored_cut, seed=0):
    """The frozen pilot at the cut the scores chose (`decide`), unless the best frozen
    pilot beats it outside noise: a measurement overrides a prediction only then."""
    chosen = pilots[f"frozen@{scored_cut}"]
    best = max((p for p in pilots.values() if p.strategy == "frozen"), key=lambda p: p.score)
    return best if lower_bound(best, chosen, seed) > 0 else chosen


def decide_by_pilots(pilots, scored_cut, train_examples, sizes, thresholds, seed=0):
    """(regime, cut, init, size, similarity, reasons) from the pilots.

    The table's choice for the data's size is kept -- small: the frozen head
    at `frozen_choice`'s cut; large: fine-tuned at that cut -- unless another
    pilot beats it outside the held-out images' noise (`lower_bound` > 0; for a
    pilot that trains more than the table's choice, `lower_bound` >
    `thresholds.costlier_margin`: a tie goes to the cheaper); then the best of
    those that do.
    """
    size = "large" if train_examples >= thresholds.large_examples else "small"
    frozen = frozen_choice(pilots, scored_cut, seed)
    table = frozen if size == "small" else next(
        p for p in pilots.values() if p.strategy == "finetuned")
    bounds = {name: lower_bound(p, table, seed) for name, p in pilots.items() if p is not table}
    needed = {name: thresholds.costlier_margin if COST[pilots[name].strategy] > COST[
        table.strategy] else 0.0 for name in bounds}
    winners = [pilots[name] for name, bound in bounds.items() if bound > needed[name]]
    chosen = max(winners, key=lambda p: p.score) if winners else table
    cut = "top" if chosen.strategy == "scratch" else chosen.cut
    similarity = "similar" if cut == "top" and chosen.strategy != "scratch" else "different"
    if chosen.strategy == "frozen":
        regime, init = f"small_{similarity}", "pretrained"
    elif chosen.strategy == "finetuned":
        regime, init = f"large_{similarity}", "pretrained"
    else:
        regime, init = "large_different", "scratch"
    ran = (f"pilots on {sizes['train']:,} of the {sizes['train'] + sizes['held_out']:,} "
           f"sampled images, scored on the {sizes['held_out']:,} held out: ")
    size_reason = (f"{train_examples:,} training images are "
                   f"{'at least' if size == 'large' else 'fewer than'} "
                   f"{thresholds.large_examples:,}, so the table says {table.name}")
    if chosen is table and not bounds:
        why = f"{ran}{table.name} {table.score:.3f}, the only pilot run"
    elif chosen is table:
        other = pilots[max(bounds, key=lambda n: pilots[n].score)]
        gap = round(100 * (other.score - table.score), 1)
        how = (f"{gap:.1f} points above it, within noise" if gap > 0 else
               f"{-gap:.1f} points below" if gap < 0 else "as good")
        verdict = "outside noise"
        if bounds[other.name] > 0:  # outside noise, yet under what a costlier choice must clear
            verdict = "by what it must"
            how = (f"{gap:.1f} points above it, 95% lower bound "
                   f"{100 * bounds[other.name]:+.1f}, under the {100 * needed[other.name]:.1f} "
                   "a choice that trains more must clear: the cheaper is kept")
        why = (f"{ran}{table.name} {table.score:.3f}; no other pilot beat it {verdict} "
               f"(the next best, {other.name} {other.score:.3f}, {how})")
    else:
        why = (f"{ran}{chosen.name} {chosen.score:.3f} beat {table.name} "
               f"{table.score:.3f} by {100 * (chosen.score - table.score):.1f} points "
               f"(95% lower bound {100 * bounds[chosen.name]:+.1f}), so the measurement "
               "overrides the table")
    if sizes.get("not_run"):
        why += (f"; not run: {', '.join(sizes['not_run'])} (a perfect score would not "
                f"have beaten {table.name} by {100 * thresholds.costlier_margin:.1f} "
                "points outside noise)")
    return regime, cut, init, size, similarity, f"{size_reason}; {why}"

