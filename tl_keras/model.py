"""The classifier: raw pixels -> preprocessing -> cut backbone -> new head.

    images [N, H, W, C], 0-255     any channel count the data has (1 to 4)
      preprocess (1x1 Conv2D)      channels -> RGB, then the backbone's own
                                   preprocess_input; fixed, never trained
      backbone                     the cut backbone (see backbones.py)
      avg_pool                     GlobalAveragePooling2D (pool_grid=1), or
      grid_pool, grid_flatten      average-pooled to a pool_grid x pool_grid grid
                                   (neither after a Dense cut: seed_cnn's fc1, fc2)
      feature_norm                 Normalization: standardises each feature with
                                   statistics of the training data, never trained
      dropout                      Dropout
      predictions                  Dense(num_classes, softmax), random init

A grid keeps where in the image a feature fired, which a global average
loses; it matters most for an early cut (`small_different`), whose features
are edges and textures rather than objects. Standardising the features makes
the head train as fast on an early cut (values in the tens) as on the top.
`feature_norm` starts as the identity; `train.run_phases` adapts it to the
training data before the first phase.

Only stock Keras layers, so a saved model loads and runs without tl_keras
(`load_model(path, compile=False)`: its optimizer may be tl_keras's, recipe.py).

Example:
    cut = backbones.build_backbone("mobilenet_v2", weights="none", image_size=64)
    model = build_classifier(cut.model, "mobilenet_v2", num_classes=10, channels=1)
"""

import keras
import numpy as np

from tl_keras import backbones

# Rows: input channels; columns: R, G, B. Grey is copied to all three; an
# alpha channel is dropped.
_TO_RGB = {
    1: np.array([[1, 1, 1]]),
    2: np.array([[1, 1, 1], [0, 0, 0]]),
    3: np.eye(3),
    4: np.concatenate([np.eye(3), np.zeros((1, 3))]),
}


def preprocess_weights(backbone_name, channels):
    """Kernel [1, 1, channels, 3] and bias [3] of the fixed preprocessing layer."""
    if channels not in _TO_RGB:
        raise ValueError(f"images must have 1 to 4 channels, got {channels}")
    kernel, bias = backbones.preprocess_affine(backbone_name)
    fused = _TO_RGB[channels].astype("float32") @ kernel
    return fused.reshape(1, 1, channels, 3), bias


def build_classifier(backbone, backbone_name, num_classes, channels=3,
                     dropout=0.2, seed=None, pool_grid=1):
    """Joins a cut backbone and a new Dense head with the functional API.

    Args:
      backbone: the cut backbone model (`CutBackbone.model`), named "backbone".
      backbone_name: its key in `backbones.BACKBONES`, for its preprocessing.
      num_classes: outputs of the new head.
      channels: channels of the images the model takes.
      dropout: dropout rate before the head.
      seed: seed of the head's random initialisation.
      pool_grid: 1 for global average pooling, g for a g x g grid of averages.

    Returns:
      A `keras.Model` from raw pixels (0-255) to class probabilities.

    Example:
      model = build_classifier(cut.model, "resnet50", num_classes=5)
    """
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if int(pool_grid) < 1:
        raise ValueError(f"pool_grid must be 1 (global average) or more, got {pool_grid}")
    height, width = backbone.input.shape[1:3]

    # === Layers ===
    preprocess = preprocess_layer(backbone_name, channels)
    pool = pooling(backbone.output.shape, pool_grid)
    norm = keras.layers.Normalization(axis=-1, name="feature_norm", dtype="float32")
    drop = keras.layers.Dropout(dropout, name="dropout", seed=seed)
    head = keras.layers.Dense(
        num_classes, activation="softmax", name="predictions", dtype="float32",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed))

    # === Functional Model ===
    inputs = keras.Input((height, width, channels), name="images")
    x = preprocess(inputs)
    x = backbone(x)
    for layer in pool:
        x = layer(x)
    x = norm(x)
    x = drop(x)
    outputs = head(x)
    return keras.Model(inputs, outputs, name=f"{backbone_name}_classifier")


def preprocess_layer(backbone_name, channels):
    """The fixed preprocessing layer, built: raw pixels (`channels`) -> the backbone's input.

    Float32 even under mixed precision: it is cheap, and float16 would round
    0-255 inputs.
    """
    layer = keras.layers.Conv2D(3, 1, name="preprocess", trainable=False, dtype="float32")
    layer.build((None, None, None, channels))
    layer.set_weights(list(preprocess_weights(backbone_name, channels)))
    return layer


def pooling(feature_shape, pool_grid=1, prefix=""):
    """The layers between a cut and the head, for features of `feature_shape`.

    None after a Dense cut (seed_cnn's fc1, fc2); a global average for
    `pool_grid` 1; else an average-pooled `pool_grid` x `pool_grid` grid, flattened.
    Their names start with `prefix`.
    """
    if len(feature_shape) == 2:
        return []
    if pool_grid == 1:
        return [keras.layers.GlobalAveragePooling2D(name=prefix + "avg_pool")]
    (window_h, stride_h), (window_w, stride_w) = (
        grid_window(feature_shape[1], pool_grid), grid_window(feature_shape[2], pool_grid))
    return [keras.layers.AveragePooling2D((window_h, window_w), (stride_h, stride_w),
                                          name=prefix + "grid_pool"),
            keras.layers.Flatten(name=prefix + "grid_flatten")]


def grid_window(size, grid):
    """(window, stride) with which average pooling turns `size` cells into exactly `grid`.

    Windows overlap where `size` is not a multiple of `grid`; a map smaller
    than the grid stays as it is.
    """
    if size < grid:
        return 1, 1
    stride = size // grid
    return size - (grid - 1) * stride, stride
