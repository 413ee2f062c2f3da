"""How a phase trains: optimizer, learning-rate schedule, layer-wise rates, gradient
clipping, weight averaging, early stopping.

A recipe is data, as a regime is: `for_phase` reads it from the config into
each `trainable.Phase`, and `optimizer` and `callbacks` turn it into Keras
objects when `train.py` compiles and fits the phase.

    head phases               AdamW at a constant rate (a new head on frozen features)
    phases that train the     config.optimizer (adamw | sgd with momentum 0.9),
    backbone (large regimes)  config.schedule (constant | cosine | steps | size_rule)
                              after a linear warm-up over config.warmup of the phase's
                              steps, config.clipnorm, config.layer_decay, config.ema,
                              config.early_stopping, config.batch_augment (mixup |
                              cutmix: the labels mixed too, augment.Mix),
                              config.accumulate (gradients of N batches per update),
                              config.lora_rank (LoRA adapters train, the backbone's
                              own weights stay: trainable.apply_phase)

The schedules, as the field uses them: cosine with warm-up (big_vision,
timm), and BiT's steps (Kolesnikov et al. 2020: the rate / 10 at 30%, 60%
and 90% of training, after a linear warm-up). Layer-wise rates follow timm's
`param_groups_layer_decay` over the backbone's named stages: the head trains
at the phase's rate, the top stage of the backbone at rate x decay, the one
below at rate x decay^2, and so on (backbones.stage_ends).

Example:
    phase.recipe            # Recipe(optimizer="adamw", schedule="cosine", warmup=0.1, ...)
    model.compile(optimizer=optimizer(phase, steps_per_epoch=157, model=model), ...)
    model.fit(..., callbacks=callbacks(phase, workdir) + [...])
"""

import dataclasses
import math
import os

import keras

from tl_keras import run_folder

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "steps", "size_rule")
BATCH_AUGMENTS = ("none", "mixup", "cutmix")
# BiT's HyperRule (big_transfer bit_hyperrule.py) by training images: below 20,000, 500
# steps with 100 of warm-up and no mixup; above, 500 of warm-up in 10,000-20,000 steps,
# mixup alpha 0.1. Here the phase's length is the epochs given: the shares are kept.
SIZE_RULE_SMALL = 20_000
SIZE_RULE_MIXUP = 0.1
STEP_BOUNDARIES = (0.3, 0.6, 0.9)  # BiT: fractions of the phase after which the rate drops / 10
SGD_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class Recipe:
    optimizer: str = "adamw"     # adamw | sgd
    schedule: str = "constant"   # constant | cosine | steps | size_rule (made concrete by `sized`)
    warmup: float = 0.0          # fraction of the phase's steps warming up linearly from 0
    clipnorm: float = 0.0        # gradients clipped to this global norm; 0: off
    layer_decay: float = 1.0     # backbone stage k below the top trains at rate x decay^k
    weight_decay: float = 0.0    # decoupled, as AdamW's
    ema: float = 0.0             # momentum of an average of the weights; 0: off
    early_stopping: int = 0      # epochs without a better task metric (val_accuracy) before stopping; 0: off
    batch_augment: str = "none"  # none | mixup | cutmix (labels mixed too)
    mix_alpha: float = 0.2       # Beta(alpha, alpha) of mixup and CutMix
    accumulate: int = 1          # batches whose gradients make one optimizer update
    lora_rank: int = 0           # LoRA adapters of this rank train instead of the backbone; 0: off

    @property
    def mixes(self):
        return self.batch_augment != "none"

    def describe(self):
        """What a phase's recipe adds to its announcement: "" for a constant AdamW rate."""
        parts = [f"{self.schedule} schedule" if self.schedule != "constant" else "",
                 f"{self.warmup:.0%} warm-up" if self.warmup else "",
                 "SGD" if self.optimizer == "sgd" else "",
                 f"layer decay {self.layer_decay:g}" if self.layer_decay != 1 else "",
                 f"clipnorm {self.clipnorm:g}" if self.clipnorm else "",
                 f"EMA {self.ema:g}" if self.ema else "",
                 f"early stopping after {self.early_stopping}" if self.early_stopping else "",
                 f"{self.batch_augment} alpha {self.mix_alpha:g}" if self.mixes else ""]
        parts = [p for p in parts if p]
        return f" ({', '.join(parts)})" if parts else ""


def for_phase(config, train):
    """The `Recipe` of a phase that trains `train` ("head" or "all") under `config`."""
    if train == "head":
        return Recipe(weight_decay=float(config.weight_decay))
    return Recipe(optimizer=config.optimizer, schedule=config.schedule,
                  warmup=float(config.warmup), clipnorm=float(config.clipnorm),
                  layer_decay=float(config.layer_decay),
                  weight_decay=float(config.weight_decay), ema=float(config.ema),
                  early_stopping=int(config.early_stopping),
                  batch_augment=config.batch_augment, mix_alpha=float(config.mix_alpha),
                  accumulate=int(config.accumulate), lora_rank=int(config.lora_rank))


def sized(recipe, train_examples):
    """`recipe` with `schedule="size_rule"` made concrete for `train_examples` images, as
    BiT's HyperRule: BiT's steps, warm-up 20% of the phase below 20,000 images and 5%
    from there, mixup (alpha 0.1) from 20,000 images. Rate and optimizer stay as set
    (BiT's own: `optimizer=sgd`, rate 0.003 x batch / 512). Other recipes as they are."""
    if recipe.schedule != "size_rule":
        return recipe
    small = train_examples < SIZE_RULE_SMALL
    return dataclasses.replace(
        recipe, schedule="steps", warmup=0.2 if small else 0.05,
        batch_augment="none" if small else "mixup",
        mix_alpha=recipe.mix_alpha if small else SIZE_RULE_MIXUP)


def check(config):
    """Raises a one-line `ValueError` for a recipe setting that cannot run."""
    for key, valid in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                       ("batch_augment", BATCH_AUGMENTS)):
        if config[key] not in valid:
            raise ValueError(f"unknown {key} {config[key]!r}; valid: {', '.join(valid)}")
    if not 0 <= config.warmup < 1:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {config.warmup}")
    if not config.clipnorm >= 0:
        raise ValueError(f"clipnorm must be 0 (off) or more, got {config.clipnorm}")
    if not 0 < config.layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1] (1: one rate), got {config.layer_decay}")
    if not 0 <= config.ema < 1:
        raise ValueError(f"ema must be in [0, 1) (0: off), got {config.ema}")
    if not config.mix_alpha > 0:
        raise ValueError(f"mix_alpha must be above 0, got {config.mix_alpha}")
    if config.early_stopping < 0:
        raise ValueError(f"early_stopping must be 0 (off) or a number of epochs, "
                         f"got {config.early_stopping}")
    if config.early_stopping and config.validation_freq != 1:
        raise ValueError("early_stopping counts validated epochs: it needs validation_freq=1, "
                         f"got {config.validation_freq}")
    for key, low, meaning in (("accumulate", 1, "at least 1 (1: an update every batch)"),
                              ("lora_rank", 0, "0 (off) or a rank of 1 or more")):
        if isinstance(config[key], bool) or int(config[key]) != config[key] or config[key] < low:
            raise ValueError(f"{key} must be {meaning}, got {config[key]!r}")
    if config.lora_rank and config.init == "scratch":
        raise ValueError("lora_rank adapts pretrained weights; init=scratch trains every weight "
                         "from random: set lora_rank=0 or init=pretrained")
    if config.distribution == "multi_worker" and (config.ema or config.early_stopping):
        # Its own training loop (distribute.fit) runs no validation callbacks, and
        # every worker would write early stopping's state.
        raise ValueError("ema and early_stopping do not run with distribution=multi_worker; "
                         "set them to 0")


# --- Optimizer ------------------------------------------------------------------

def optimizer(phase, steps_per_epoch, model=None):
    """A new Keras optimizer for `phase` (a `trainable.Phase`), its schedule spread over
    the phase's epochs of `steps_per_epoch` steps. `model`: the classifier, whose
    backbone stages get their layer-wise rates (recipe.layer_decay < 1)."""
    recipe = phase.recipe
    batches = max(1, (phase.last_epoch - phase.first_epoch) * int(steps_per_epoch))
    kwargs = dict(learning_rate=schedule(recipe, phase.learning_rate, batches),
                  global_clipnorm=recipe.clipnorm or None,
                  use_ema=recipe.ema > 0, ema_momentum=recipe.ema or 0.99)
    if recipe.accumulate > 1:  # Keras averages the N batches' gradients, then updates
        kwargs.update(gradient_accumulation_steps=recipe.accumulate)
    if recipe.optimizer == "sgd":
        kwargs.update(momentum=SGD_MOMENTUM, weight_decay=recipe.weight_decay or None)
    else:  # AdamW's own default is 0.004, not 0
        kwargs.update(weight_decay=recipe.weight_decay)
    scales = rate_scales(model, phase, recipe.layer_decay) if model is not None else {}
    if scales:
        cls = LayerwiseSGD if recipe.optimizer == "sgd" else LayerwiseAdamW
        return cls(rate_scales=scales, **kwargs)
    return (keras.optimizers.SGD if recipe.optimizer == "sgd" else keras.optimizers.AdamW)(**kwargs)


def schedule(recipe, peak, batches):
    """The learning rate of a phase of `batches` batches: `peak`, or a schedule reaching
    it, counted in optimizer updates (one every `recipe.accumulate` batches)."""
    steps = max(1, math.ceil(batches / recipe.accumulate))
    warmup = int(round(recipe.warmup * steps))
    if recipe.schedule == "constant" and not warmup:
        return peak
    return Schedule(peak, steps, warmup, recipe.schedule, every=recipe.accumulate)


@keras.saving.register_keras_serializable(package="tl_keras")
class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """`peak` after a linear warm-up from 0 over `warmup` steps, then held (`constant`),
    down to 0 along a half cosine over the remaining steps (`cosine`, as Keras'
    CosineDecay with a warm-up), or divided by 10 after 30%, 60% and 90% of `steps`
    (`steps`, BiT's).

    Plain arithmetic, no `cond`: Keras' AdamW reads the rate again for each variable's
    weight decay, so the schedule is traced once per variable (Keras' CosineDecay made
    a tiny run's first epoch ~4 s slower to trace). `steps` and `warmup` count
    optimizer updates; with gradient accumulation Keras' step counter counts
    batches, `every` of them per update.
    """

    def __init__(self, peak, steps, warmup=0, shape="cosine", every=1):
        self.peak, self.steps, self.warmup, self.shape = float(peak), int(steps), int(warmup), shape
        self.every = int(every)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        if self.every > 1:
            step = keras.ops.floor(step / self.every)
        rate = keras.ops.convert_to_tensor(self.peak, "float32")
        if self.shape == "cosine":
            after = keras.ops.clip((step - self.warmup) / max(1, self.steps - self.warmup), 0, 1)
            rate = rate * 0.5 * (1 + keras.ops.cos(math.pi * after))
        elif self.shape == "steps":
            for fraction in STEP_BOUNDARIES:
                rate = keras.ops.where(step >= fraction * self.steps, rate * 0.1, rate)
        if self.warmup:
            rate = rate * keras.ops.minimum(1.0, step / self.warmup)
        return rate

    def get_config(self):
        return {"peak": self.peak, "steps": self.steps, "warmup": self.warmup,
                "shape": self.shape, "every": self.every}


def rate_scales(model, phase, decay):
    """{variable path: decay^k} of the backbone's trainable variables in its k-th stage
    from the top (k = 1 for the top stage); {} when `decay` is 1. Variables
    outside the backbone (the head) keep the phase's rate."""
    if decay == 1:
        return {}
    backbone = model.get_layer("backbone")
    stage_of = {name: i for i, name in enumerate(phase.stage_ends)}
    bounds = [i for i, layer in enumerate(backbone.layers)
              if layer.name in stage_of and i < len(backbone.layers) - 1]
    stages = len(bounds) + 1  # the top stage runs from the last boundary to the output
    scales = {}
    for i, layer in enumerate(backbone.layers):
        below = sum(1 for b in bounds if i > b)  # boundaries passed: 0 is the lowest stage
        k = stages - below  # the top stage is 1
        for variable in layer.trainable_weights:
            scales[variable.path] = decay ** k
    return scales


class _Layerwise:
    """An optimizer whose update of each variable in `rate_scales` (path -> factor)
    takes the learning rate times that factor."""

    def __init__(self, *args, rate_scales=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rate_scales = dict(rate_scales or {})

    def update_step(self, gradient, variable, learning_rate):
        # Under TensorFlow the update sees the backend's variable: find ours by index.
        path = self._trainable_variables[self._get_variable_index(variable)].path
        scale = self.rate_scales.get(path)
        if scale is not None:
            learning_rate = learning_rate * scale
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "rate_scales": self.rate_scales}


@keras.saving.register_keras_serializable(package="tl_keras")
class LayerwiseAdamW(_Layerwise, keras.optimizers.AdamW):
    """AdamW with a learning-rate factor per variable (layer-wise rate decay)."""


@keras.saving.register_keras_serializable(package="tl_keras")
class LayerwiseSGD(_Layerwise, keras.optimizers.SGD):
    """SGD with a learning-rate factor per variable (layer-wise rate decay)."""


# --- Callbacks ------------------------------------------------------------------

def callbacks(phase, workdir, best_record=None, monitor="val_accuracy"):
    """The recipe's callbacks for `phase`, to run before the ones that save the model:
    weight averaging (the averaged weights are validated, saved and kept) and
    early stopping (its state kept in `workdir`/backup, so a resumed run goes on
    counting). `best_record`: backup/best.json of the run's best.keras; `monitor`: the
    task's validation metric, which early stopping watches."""
    recipe = phase.recipe
    out = []
    if recipe.ema:
        out.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if recipe.early_stopping:
        out.append(EarlyStopping(
            patience=recipe.early_stopping, monitor=monitor,
            state=os.path.join(workdir, "backup", f"{phase.name}.early_stopping.json"),
            best_model=os.path.join(workdir, "best.keras"), best_record=best_record))
    return out


class EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping on `monitor` (maximised), restoring the best weights, that survives
    a kill: its count and best are written to `state` after every epoch (Keras keeps
    them in memory only, keras-team/keras#14862) and read back when `fit` starts.
    The best weights of an epoch before the kill are read from `best_model`
    (best.keras) when `best_record` says it holds that epoch; otherwise the
    weights the run resumed with stand in for them."""

    def __init__(self, patience, state, best_model=None, best_record=None,
                 monitor="val_accuracy"):
        super().__init__(monitor=monitor, mode="max", patience=patience,
                         restore_best_weights=True)
        self.state, self.best_model, self.best_record = state, best_model, best_record

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if not os.path.exists(self.state):
            return
        saved = run_folder.read_json(self.state)
        self.wait, self.best, self.best_epoch = saved["wait"], saved["best"], saved["best_epoch"]
        self.best_weights = self._saved_best() or self.model.get_weights()

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.best is None:
            return
        os.makedirs(os.path.dirname(self.state), exist_ok=True)
        run_folder.write_json(self.state, {"wait": self.wait, "best": float(self.best),
                                           "best_epoch": self.best_epoch})

    def _saved_best(self):
        """The weights of best.keras if its record names this phase's best epoch, else None."""
        if not (self.best_model and self.best_record and os.path.exists(self.best_model)
                and os.path.exists(self.best_record)):
            return None
        if run_folder.read_json(self.best_record).get("epoch") != self.best_epoch + 1:
            return None
        from tl_keras import model as model_lib

        return model_lib.load_model(self.best_model).get_weights()
