"""A config resolved once into the plan a run follows.

    config (configs/*.py, flags)  --resolve-->  Plan (immutable)

`resolve` checks every setting before any work (regime, backbone, cut, init,
epochs, task, loss, distribution: each wrong one a `ValueError` of one line that
lists the valid values), fills in what the regime and the backbone decide (the
cut point, the image size), and plans the training phases. Building
(train.build), training (train.finetune), the tuner (tune.py) and the run
folder (config.json) all read the same `Plan`; nothing resolves the config again
(with regime=auto, prepare.py resolves the stand-in, then the advised regime once).

Example:
    plan = resolve(configs.small_similar.get_config())
    plan.cut, plan.cut_layer, plan.image_size   # "top", "top_activation", 96
    [phase.name for phase in plan.phases]       # ["head"]
"""

import dataclasses
import json
import math
import os
import sys
import tempfile

import ml_collections

from tl_keras import backbones, recipe, tables, tasks, trainable

DISTRIBUTIONS = ("auto", "none", "mirrored", "multi_worker", "tpu")
MIXED_PRECISION = ("", "float32", "mixed_float16", "mixed_bfloat16")
MAX_IMAGE_SIZE = 2048  # above this an image classifier's activations outgrow any device

# key: (lowest allowed, what it means when wrong)
_AT_LEAST = {
    "batch_size": (1, "at least 1"),
    "image_size": (1, "0 (the backbone's own) or more"),
    "max_examples": (0, "0 (all) or more"),
    "examples_per_class": (0, "0 (all) or more"),
    "cached_views": (1, "at least 1"),
    "pool_grid": (1, "1 (global average) or more"),
    "validation_freq": (1, "at least 1"),
    "inference_batch_size": (0, "0 (the training batch size) or more"),
    "head_steps_per_execution": (1, "at least 1"),
    "head_epochs": (0, "0 (no head phase) or more"),
    "image_cache_bytes": (0, "0 (no image cache) or more"),
    "feature_cache_bytes": (0, "0 (features on disk) or more"),
    "peer_timeout": (1, "at least 1 (seconds)"),
    "advisor.sample": (2, "at least 2"),
    "advisor.large_examples": (1, "at least 1"),
    "advisor.pilot_epochs": (1, "at least 1"),
    "rand_augment": (0, "0 (off) or more"),
}


_ONE_OF = {
    "augment_flip": ("horizontal", "vertical", "horizontal_and_vertical", "none"),
    "verbose": ("auto", "0", "1", "2"),
    "class_weight": ("none", "balanced"),
    "advisor.scratch_pilot": ("large", "always", "never"),
    "token_pool": ("cls_mean", "cls", "mean"),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    config: ml_collections.FrozenConfigDict  # every setting, cut and image_size filled in
    backbone: backbones.Backbone  # the entry of backbones.BACKBONES
    weights: str                  # what the backbone starts from ("none" with init=scratch)
    cut: str                      # a named cut point or a layer name
    cut_layer: str                # the layer the backbone is cut at
    image_size: int
    phases: tuple                 # trainable.Phase, in order
    task: tasks.Task              # what the run predicts: head, loss, metric, labels
    loss: object                  # what `compile` takes (the task's)
    distribution: str             # a name of DISTRIBUTIONS

    def to_dict(self):
        """The resolved config as config.json holds it."""
        return to_dict(self.config)

    def with_workdir(self, workdir):
        """The same plan writing into `workdir` (nothing else depends on it)."""
        config = editable(self.config)
        config.workdir = workdir
        return dataclasses.replace(self, config=ml_collections.FrozenConfigDict(config))


def resolve(config):
    """The `Plan` of `config` (a ConfigDict; configs/base.py has every key).

    A `Plan` is returned as it is, so functions that take either resolve once.
    Raises `ValueError` (one line) for any setting that cannot run.
    """
    if isinstance(config, Plan):
        return config
    config = with_defaults(config)
    if "," in str(config.backbone):
        raise ValueError(f"--backbone={config.backbone} names several backbones: only "
                         "tools/advise.py and tools/finetune.py --regime=auto take several "
                         "(the advisor picks one); a run or a sweep trains one")
    task = tasks.get_task(config.task)
    backbone = backbones.get_backbone(config.backbone)
    config.cut = _cut(config)
    config.image_size = config.image_size or backbone.image_size
    _check_numbers(config)
    tables.check_settings(config.table)
    if config.distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {config.distribution!r}; "
                         f"valid: {', '.join(DISTRIBUTIONS)}")
    if config.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"unknown mixed_precision {config.mixed_precision!r}; valid: "
                         f"{', '.join(repr(m) for m in MIXED_PRECISION)}")
    config.workdir = _workdir(config.workdir)
    phases = tuple(trainable.plan_phases(config))
    weights = "none" if config.init == "scratch" else config.weights
    backbones.check_weights(weights)  # a missing file: refused before the data is read
    return Plan(
        config=ml_collections.FrozenConfigDict(config),
        backbone=backbone,
        weights=weights,
        cut=config.cut,
        cut_layer=backbone.cuts.get(config.cut, config.cut),
        image_size=int(config.image_size),
        phases=phases,
        task=task,
        loss=task.loss(config.label_smoothing),
        distribution=config.distribution)


def _check_numbers(config):
    for key, value in _numbers(config):  # inf and nan train nothing: refused, not run
        if not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value}")
    for key, (low, meaning) in _AT_LEAST.items():
        value = _at(config, key)
        if int(value) < low:
            raise ValueError(f"{key} must be {meaning}, got {value}")
    if not 0 <= config.scratch_batchnorm_momentum < 1:
        raise ValueError("scratch_batchnorm_momentum must be in [0, 1), got "
                         f"{config.scratch_batchnorm_momentum}")
    for key in ("similar_margin", "scratch_margin", "costlier_margin"):
        if not config.advisor[key] >= 0:
            raise ValueError(f"advisor.{key} must be 0 or more, got {config.advisor[key]}")
    if not config.advisor.pilot_passes > 0:
        raise ValueError(f"advisor.pilot_passes must be above 0, got {config.advisor.pilot_passes}")
    if not 0 < config.advisor.pilot_held_out < 1:
        raise ValueError("advisor.pilot_held_out must be between 0 and 1, got "
                         f"{config.advisor.pilot_held_out}")
    if config.image_size > MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be at most {MAX_IMAGE_SIZE}, got {config.image_size}")
    for key in ("learning_rate", "finetune_learning_rate"):
        if not config[key] > 0:
            raise ValueError(f"{key} must be above 0, got {config[key]}")
    for key in ("val_fraction", "dropout", "augment_zoom", "augment_rotation"):
        if not 0 <= config[key] < 1:
            raise ValueError(f"{key} must be in [0, 1), got {config[key]}")
    if not 0 <= config.rand_augment_magnitude <= 1:
        raise ValueError("rand_augment_magnitude must be in [0, 1], got "
                         f"{config.rand_augment_magnitude}")
    if not config.weight_decay >= 0:
        raise ValueError(f"weight_decay must be 0 or more, got {config.weight_decay}")
    recipe.check(config)  # optimizer, schedule, ... and what they need of the run
    for key, valid in _ONE_OF.items():
        if str(_at(config, key)) not in valid:
            raise ValueError(f"unknown {key} {_at(config, key)!r}; valid: {', '.join(valid)}")


# How a phase that trains the backbone trains (recipe.for_phase(config, "all")); a head
# phase reads none of them.
BACKBONE_RECIPE_KEYS = ("optimizer", "schedule", "warmup", "clipnorm", "layer_decay", "ema",
                        "early_stopping", "batch_augment", "mix_alpha", "accumulate", "lora_rank")


def unused_recipe(plan):
    """A sentence naming the keys of BACKBONE_RECIPE_KEYS that `plan` sets (other than
    configs/base.py) although none of its phases trains the backbone, else None: a run
    refuses them (api.finetune_config), as they would do nothing."""
    if any(phase.train == "all" for phase in plan.phases):
        return None
    from tl_keras.configs import base

    defaults = base.get_config()
    unused = [key for key in BACKBONE_RECIPE_KEYS if plan.config[key] != defaults[key]]
    if not unused:
        return None
    return (f"{', '.join(unused)} set{'s' if len(unused) == 1 else ''} how phases that "
            f"train the backbone train, and regime {plan.config.regime!r} trains only the head")


def refuse_unused_recipe(plan):
    """A one-line `ValueError` when `unused_recipe(plan)` names keys (a run, a sweep)."""
    unused = unused_recipe(plan)
    if unused:
        raise ValueError(f"{unused}; leave those keys unset, or choose large_similar or "
                         "large_different")


def _at(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def _numbers(config, prefix=""):
    """(dotted key, value) of every int or float setting, nested ones included."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def _workdir(workdir):
    """`workdir` normalised (a trailing slash resumes the same run), checked writable."""
    return writable_folder(workdir, "workdir") if workdir else workdir


def writable_folder(path, flag="workdir"):
    """`path` normalised, after checking that it is a folder or can become one and that
    files can be made there; else a one-line `ValueError` naming `--flag`."""
    path = os.path.normpath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a folder; choose another --{flag}")
    parent = path
    while not os.path.exists(parent):  # the nearest folder that exists must take new ones
        parent = os.path.dirname(parent) or "."
    if not os.path.isdir(parent):
        raise ValueError(f"cannot create {flag} {path!r}: {parent!r} is a file; "
                         f"choose another --{flag}")
    try:  # a real try, as root passes every permission check yet cannot write in /proc
        tempfile.TemporaryDirectory(dir=parent, prefix=".tl_keras-check-").cleanup()
    except OSError as e:
        raise ValueError(f"cannot create the {'run folder' if flag == 'workdir' else flag} in "
                         f"{parent!r}: {e.strerror}; choose another --{flag}") from None
    return path


def editable(config):
    """A mutable, unlocked copy of a config (a `Plan`'s frozen one included)."""
    if isinstance(config, ml_collections.FrozenConfigDict):
        # as_configdict() returns one cached ConfigDict per frozen one: copied, or two
        # "copies" of a plan's config would be one object, each change seen by both.
        config = config.as_configdict()
    config = config.copy_and_resolve_references()
    config.unlock()  # ml_collections' flags lock it; a copy may take new keys (advice)
    return config


def with_defaults(config):
    """configs/base.py's defaults with `config` (a ConfigDict or a dict, e.g. an older
    run's config.json) over them: every key is there, and its default has one home."""
    from tl_keras.configs import base

    merged = base.get_config()
    merged.update(editable(config) if isinstance(config, ml_collections.ConfigDict)
                  else ml_collections.ConfigDict(config))
    return merged


def to_dict(config):
    """`config` as plain JSON values, keys sorted."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _cut(config):
    """The cut the run uses: `config.cut`, or the regime's default."""
    regime = trainable.get_regime(config.regime)
    cut = config.cut or regime.cut
    if regime.cuts and cut in backbones.CUT_POINTS and cut not in regime.cuts:
        raise ValueError(
            f"regime {config.regime!r} cuts at {', '.join(regime.cuts[:-1])} or {regime.cuts[-1]} "
            f"(or a layer name), not {cut!r}")
    return cut


def interactive():
    """Whether output goes to a person: a terminal, or a Jupyter kernel (whose output
    is no terminal, yet renders Keras' progress bars)."""
    return sys.stdout.isatty() or "ipykernel" in sys.modules


def verbosity(verbose="auto"):
    """Keras' `verbose` for `config.verbose`: "auto" is a progress bar for a person
    (`interactive`), a line per epoch in a log."""
    if verbose != "auto":
        return int(verbose)
    return 1 if interactive() else 2
