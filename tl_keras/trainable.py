"""The four regimes as data, and the one function that applies them.

A regime says where the backbone is cut and what trains. `plan_phases` turns
a config into training phases; `apply_phase` sets `trainable` on the model for
one phase. After `apply_phase` the model must be (re)compiled: Keras collects
the trainable weights at compile time.

| regime           | cut    | trains                                       |
|------------------|--------|----------------------------------------------|
| small_similar    | top    | the head; the backbone is frozen             |
| small_different  | early  | the head; the backbone is frozen             |
| large_similar    | top    | the head, then everything at a low rate      |
| large_different  | top    | as large_similar; init=scratch: everything   |
|                  |        | from random weights, BatchNorm included      |

Phase 2 of the large regimes can unfreeze only the top `unfreeze` stages of
the backbone, a stage being the layers between two named cut points
(backbones.py: early, middle, late); the stages below stay frozen.

BatchNorm layers stay in inference mode, their moving statistics unchanged,
whenever the backbone starts from pretrained weights, in every phase.
Calling the backbone with `training=False` does not achieve this in Keras 3
(`fit` passes `training=True` through it, keras-team/keras#20285), so each
BatchNormalization layer is frozen on its own.

`plan.resolve` calls `plan_phases` once; the phases are `Plan.phases`.

Example:
    for phase in plan.phases:
        apply_phase(model, phase)
        model.compile(...)
        model.fit(..., initial_epoch=phase.first_epoch, epochs=phase.last_epoch)
"""

import dataclasses
import math

import keras

from tl_keras import backbones, keras_internals, recipe as recipe_lib


@dataclasses.dataclass(frozen=True)
class Regime:
    cut: str                  # default cut point
    train: str                # "head": backbone frozen; "all": head first, then everything
    cuts: tuple = ()          # named cut points allowed; () allows all of them


REGIMES = {
    "small_similar": Regime(cut="top", train="head"),
    # `late` too: one stage below the top was the best frozen cut on data unlike the
    # pretraining data in the study (docs/study.md); `top` is small_similar.
    "small_different": Regime(cut="early", train="head", cuts=("early", "middle", "late")),
    "large_similar": Regime(cut="top", train="all"),
    "large_different": Regime(cut="top", train="all"),
}

INITS = ("pretrained", "scratch")


def get_regime(name):
    """Returns the `Regime` for `name`, or raises a `ValueError` listing the valid names."""
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r}; valid regimes: {', '.join(REGIMES)}")
    return REGIMES[name]


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    train: str               # "head" or "all"
    first_epoch: int         # `initial_epoch` of fit
    last_epoch: int          # `epochs` of fit
    learning_rate: float
    freeze_batchnorm: bool
    batchnorm_momentum: float = 0.0  # > 0: set on every BatchNorm layer (init=scratch)
    unfreeze: int = 0        # train == "all": only the top `unfreeze` stages train; 0: all
    stage_ends: tuple = ()   # the layers that end the backbone's stages (named cut points)
    recipe: recipe_lib.Recipe = recipe_lib.Recipe()  # optimizer, schedule, ... (recipe.py)


def plan_phases(config):
    """The training phases of `config`, in order.

    Frozen regimes train the head alone for `config.epochs`. The large
    regimes from pretrained weights train the head alone for
    `config.head_epochs` (a random head's large gradients would wreck the
    pretrained features), then everything at `config.finetune_learning_rate`
    until `config.epochs`. `init="scratch"` trains everything from the start.
    Epochs count across phases, so `history.csv` reads as one run.
    """
    regime = get_regime(config.regime)
    if config.init not in INITS:
        raise ValueError(f"unknown init {config.init!r}; valid inits: {', '.join(INITS)}")
    if config.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {config.epochs}")
    unfreeze = config.unfreeze
    if unfreeze < 0:
        raise ValueError(f"unfreeze must be 0 (all) or a number of stages, got {unfreeze}")
    if unfreeze and (regime.train == "head" or config.init == "scratch"):
        raise ValueError(
            "unfreeze applies to phase 2 of the large regimes from pretrained weights; "
            f"regime {config.regime!r} with init={config.init!r} has no such phase")
    if regime.train == "head":
        if config.init == "scratch":
            raise ValueError(
                f"init='scratch' trains every weight; regime {config.regime!r} "
                "freezes the backbone (use large_different)")
        return [Phase("head", "head", 0, config.epochs, config.learning_rate, True,
                      recipe=recipe_lib.for_phase(config, "head"))]
    if config.init == "scratch":
        # Keras Applications' BatchNorm momentum (0.999 in MobileNet, EfficientNet)
        # suits ImageNet-length training; from random weights on a few thousand
        # images the moving statistics would still be near their initial values
        # at the end, and validation accuracy stays at chance (measured).
        return [Phase("scratch", "all", 0, config.epochs, config.learning_rate, False,
                      batchnorm_momentum=config.scratch_batchnorm_momentum,
                      # One rate: nothing pretrained for lower rates to keep.
                      recipe=dataclasses.replace(recipe_lib.for_phase(config, "all"),
                                                 layer_decay=1.0))]
    head_epochs = min(config.head_epochs, config.epochs)
    phases = []
    if head_epochs > 0:
        phases.append(Phase("head", "head", 0, head_epochs, config.learning_rate, True,
                            recipe=recipe_lib.for_phase(config, "head")))
    if config.epochs > head_epochs:
        phases.append(Phase("finetune", "all", head_epochs, config.epochs,
                            config.finetune_learning_rate, True, unfreeze=unfreeze,
                            stage_ends=backbones.stage_ends(config.backbone),
                            recipe=recipe_lib.for_phase(config, "all")))
    return phases


def apply_phase(model, phase):
    """Sets `trainable` on `model` for `phase`; recompile afterwards.

    The head's Dense layer always trains (its `feature_norm` never does); the
    backbone (the layer named "backbone") trains only when
    `phase.train == "all"`, and then without its BatchNormalization layers if
    `phase.freeze_batchnorm`. A `phase.batchnorm_momentum` (init=scratch) is
    set on every BatchNormalization layer of the backbone. The backbone's Dropout
    layers drop only while it trains. With
    `phase.unfreeze = k`, the backbone's layers up to the end of its k-th
    stage from the top stay frozen.
    """
    backbone = model.get_layer("backbone")
    backbone.trainable = phase.train == "all"  # Keras sets every sublayer
    if phase.train == "all" and phase.unfreeze:
        for layer in frozen_stages(backbone, phase.unfreeze, phase.stage_ends):
            layer.trainable = False
    if phase.train == "all" and phase.recipe.lora_rank:
        enable_lora(backbone, phase.recipe.lora_rank)
    for layer in _sublayers(backbone):
        if isinstance(layer, keras.layers.BatchNormalization):
            if phase.train == "all" and phase.freeze_batchnorm:
                layer.trainable = False
            if phase.batchnorm_momentum:
                layer.momentum = phase.batchnorm_momentum
        if isinstance(layer, keras.layers.Dropout):
            _dropout_while_training(layer, phase.train == "all")
    model.get_layer("predictions").trainable = True


def _dropout_while_training(layer, training):
    """A backbone's own dropout (EfficientNet's stochastic depth) only while the backbone
    trains. A frozen backbone runs as at inference (Keras' transfer-learning guide runs
    it with training=False), so `fit` trains a head on the very features the feature
    cache holds; before, it saw randomly dropped blocks (issue 38). Keras' Dropout reads
    `rate` at each call; the layer's own rate is kept to restore it."""
    if not hasattr(layer, "_tl_keras_rate"):
        layer._tl_keras_rate = layer.rate
    layer.rate = layer._tl_keras_rate if training else 0.0


def enable_lora(backbone, rank):
    """LoRA adapters of `rank` on every layer of `backbone` that takes them (Keras'
    `enable_lora`: Dense, EinsumDense, Conv, Embedding), their own kernels and
    biases frozen; every other weight of the backbone frozen too. Returns how many layers got one.

    Adapters start as a no-op (B = 0). Saved models hold them merged into plain
    kernels (model.save_model).
    """
    adapted = 0
    for layer in keras_internals.leaf_layers(backbone):
        if hasattr(layer, "enable_lora") and layer.weights and layer.trainable:
            if not layer.lora_enabled:
                layer.enable_lora(rank)
            if getattr(layer, "bias", None) is not None:
                layer.bias.trainable = False  # Keras' LoRA trains biases; LoRA's adapters alone
            adapted += 1
        elif layer.weights:
            layer.trainable = False
    if not adapted:
        raise ValueError("lora_rank: no layer of this backbone takes LoRA adapters "
                         "(Dense, EinsumDense, Conv, Embedding)")
    return adapted


def frozen_stages(backbone, unfreeze, stage_ends):
    """The layers of `backbone` below its top `unfreeze` stages, in order.

    Stages end at the `stage_ends` layers the backbone has below its output
    (a backbone cut at `middle` has two stages: up to `early`, and the rest).
    Asking for as many stages as there are, or more, freezes nothing.
    """
    layers = backbone.layers  # topological order; a cut backbone is flat
    index = {layer.name: i for i, layer in enumerate(layers)}
    ends = sorted(index[name] for name in stage_ends
                  if name in index and index[name] < len(layers) - 1)
    if unfreeze > len(ends):
        return []
    return layers[:ends[-unfreeze] + 1]


def _sublayers(layer):
    for sub in getattr(layer, "layers", ()):
        yield sub
        yield from _sublayers(sub)


def count_params(model):
    """(trainable, non_trainable) parameter counts of `model` as it is now."""
    trainable = sum(_size(w) for w in model.trainable_weights)
    non_trainable = sum(_size(w) for w in model.non_trainable_weights)
    return trainable, non_trainable


def _size(weight):
    return math.prod(weight.shape)
