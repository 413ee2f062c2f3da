"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates"; fastai's
`lr_find`): train one phase for a few batches at rates rising exponentially,
record the loss at each, and suggest the rate a tenth of the one where the
loss was lowest.

    model + phase --range_test--> RangeTest(rates, losses, suggestion) --draw--> lr_find.png

The model's weights (and BatchNorm statistics) are put back afterwards: the
test trains nothing that stays. Its trainable flags are left as the phase
sets them, and it must be compiled again before `fit`.

Example:
    test = range_test(model, plan.phases[-1], datasets.train, steps=100)
    test.suggestion   # e.g. 3e-4
"""

import dataclasses
import math

import numpy as np

from tl_keras import keras_internals, recipe as recipe_lib, trainable


@dataclasses.dataclass
class RangeTest:
    phase: str          # the phase's name
    rates: list         # the rate of each step
    losses: list        # the loss at each step, smoothed (bias-corrected moving average)
    suggestion: float   # a tenth of the rate at the lowest smoothed loss
    steepest: float     # the rate where the smoothed loss fell fastest (after the first 10%)

    def to_dict(self):
        return dataclasses.asdict(self)


PER_DECADE = 4  # rates tried per factor of 10 at least: coarser, the lowest loss is a guess


def check_range(steps, min_rate, max_rate):
    """A one-line `ValueError` unless `steps` rates from `min_rate` to `max_rate` make a
    test: a whole number of at least 5 steps, finite rates, 0 < min_rate < max_rate,
    and at least `PER_DECADE` rates per factor of 10."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 5:
        raise ValueError(f"steps must be a whole number, at least 5, got {steps!r}")
    for name, value in (("min_rate", min_rate), ("max_rate", max_rate)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not 0 < min_rate < max_rate:
        raise ValueError(f"need 0 < min_rate < max_rate, got {min_rate} and {max_rate}")
    decades = math.log10(max_rate / min_rate)
    if steps < PER_DECADE * decades:
        raise ValueError(
            f"{steps} steps over {decades:.1f} decades ({min_rate:g} to {max_rate:g}) try "
            f"{steps / decades:.1f} rates per factor of 10; give at least {PER_DECADE}: "
            f"--steps={math.ceil(PER_DECADE * decades)} or a narrower --min_rate/--max_rate")


def range_test(model, phase, batches, loss, steps=100, min_rate=1e-7, max_rate=1.0,
               smoothing=0.98, stop_factor=4.0):
    """Runs the range test of `phase` on `model`, reading (images, labels) `batches`.

    Args:
      model: a classifier from `train.build`.
      phase: a `trainable.Phase` (its trainable part and optimizer are used).
      batches: an iterable of batches, read again from the start if it ends.
      loss: what `compile` takes (`plan.loss`).
      steps: rates tried, from `min_rate` to `max_rate`, evenly in log space.
      stop_factor: stop once the smoothed loss exceeds this x its lowest.

    Returns:
      `RangeTest`.
    """
    check_range(steps, min_rate, max_rate)
    saved = model.get_weights()
    try:
        return _run(model, phase, batches, loss, steps, min_rate, max_rate, smoothing,
                    stop_factor)
    finally:
        model.set_weights(saved)


def _run(model, phase, batches, loss, steps, min_rate, max_rate, smoothing, stop_factor):
    trainable.apply_phase(model, phase)
    constant = dataclasses.replace(phase.recipe, schedule="constant", warmup=0.0, ema=0.0)
    optimizer = recipe_lib.optimizer(dataclasses.replace(phase, recipe=constant), 1, model)
    model.compile(optimizer=optimizer, loss=loss)
    rates = np.geomspace(min_rate, max_rate, steps)
    tried, losses, average, best = [], [], 0.0, math.inf
    for i, (rate, (x, y)) in enumerate(zip(rates, _forever(batches))):
        if i == 0:
            keras_internals.build_before_tracing(model, (x, y))  # the step traced once
        optimizer.learning_rate.assign(float(rate))
        value = float(model.train_on_batch(x, y))
        if not math.isfinite(value):
            break
        average = smoothing * average + (1 - smoothing) * value
        smoothed = average / (1 - smoothing ** (i + 1))
        tried.append(float(rate))
        losses.append(smoothed)
        best = min(best, smoothed)
        if i > 0 and smoothed > stop_factor * best:
            break
    if len(losses) < 3:
        raise ValueError(f"the loss diverged within {len(losses)} steps from rate {min_rate:g}; "
                         "try a lower --min_rate")
    lowest = int(np.argmin(losses))
    slopes = np.gradient(np.asarray(losses), np.log(tried))
    # The first steps' average is noisy (a few batches): the steepest fall is looked for
    # after them, as fastai's plot skips its start.
    skip = min(max(1, len(tried) // 10), lowest)
    return RangeTest(phase=phase.name, rates=tried, losses=losses,
                     suggestion=tried[lowest] / 10,
                     steepest=tried[skip + int(np.argmin(slopes[skip:lowest + 1]))])


def _forever(batches):
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("no training batches to run the range test on")


def draw(test, path):
    """Loss against rate (log scale), the suggestion marked, as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(test.rates, test.losses)
    ax.axvline(test.suggestion, color="tab:green", linestyle="--",
               label=f"suggested {test.suggestion:.2g} (lowest / 10)")
    ax.axvline(test.steepest, color="tab:orange", linestyle=":",
               label=f"steepest {test.steepest:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(f"Learning-rate range test, phase {test.phase!r}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rate_key(phase):
    """The config key that sets `phase`'s rate."""
    return "finetune_learning_rate" if phase.name == "finetune" else "learning_rate"
