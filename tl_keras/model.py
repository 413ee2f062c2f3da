"""The classifier: raw pixels -> preprocessing -> cut backbone -> new head.

    images [N, H, W, C], 0-255     any channel count the data has (1 to 4)
      preprocess (1x1 Conv2D)      channels -> RGB, then the backbone's own
                                   preprocess_input; fixed, never trained
      backbone                     the cut backbone (see backbones.py)
      avg_pool                     GlobalAveragePooling2D (pool_grid=1), or
      grid_pool, grid_flatten      average-pooled to a pool_grid x pool_grid grid
                                   (neither after a Dense cut: seed_cnn's fc1, fc2);
                                   a transformer's tokens [N, T, D]: the class token
                                   and/or the mean of the patch tokens (token_pool)
      feature_norm                 Normalization: standardises each feature with
                                   statistics of the training data, never trained
      dropout                      Dropout
      predictions                  Dense(num_classes, the task's activation: softmax),
                                   random init

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

from tl_keras import backbones, keras_internals

keras_internals.cache_saving_skipsets()  # every save and load here, every epoch's backup

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
                     dropout=0.2, seed=None, pool_grid=1, token_pool="cls_mean",
                     activation="softmax"):
    """Joins a cut backbone and a new Dense head with the functional API.

    Args:
      backbone: the cut backbone model (`CutBackbone.model`), named "backbone".
      backbone_name: its key in `backbones.BACKBONES`, for its preprocessing.
      num_classes: outputs of the new head.
      channels: channels of the images the model takes.
      dropout: dropout rate before the head.
      seed: seed of the head's random initialisation.
      pool_grid: 1 for global average pooling, g for a g x g grid of averages.
      token_pool: a transformer's tokens: "cls" (the class token), "mean" (of
        the patch tokens) or "cls_mean" (both, concatenated: DINOv2's linear
        evaluation); a backbone without a class token takes the mean.
      activation: the head's, the task's (`tasks.Task.activation`).

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
    norm = keras.layers.Normalization(axis=-1, name="feature_norm", dtype="float32")
    drop = keras.layers.Dropout(dropout, name="dropout", seed=seed)
    head = keras.layers.Dense(
        num_classes, activation=activation, name="predictions", dtype="float32",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed))

    # === Functional Model ===
    inputs = keras.Input((height, width, channels), name="images")
    x = preprocess(inputs)
    x = backbone(x)
    x = pool(x, pool_grid, token_pool=token_pool,
             prefix_tokens=backbones.get_backbone(backbone_name).prefix_tokens)
    x = norm(x)
    x = drop(x)
    outputs = head(x)
    return keras.Model(inputs, outputs, name=f"{backbones.slug(backbone_name)}_classifier")


def preprocess_layer(backbone_name, channels):
    """The fixed preprocessing layer, built: raw pixels (`channels`) -> the backbone's input.

    Float32 even under mixed precision: it is cheap, and float16 would round
    0-255 inputs.
    """
    layer = keras.layers.Conv2D(3, 1, name="preprocess", trainable=False, dtype="float32")
    layer.build((None, None, None, channels))
    layer.set_weights(list(preprocess_weights(backbone_name, channels)))
    return layer


TOKEN_POOLS = ("cls_mean", "cls", "mean")


def pool(x, pool_grid=1, prefix="", token_pool="cls_mean", prefix_tokens=0):
    """`x` (a cut's output) pooled into the head's input vector, with stock layers.

    Nothing after a Dense cut (seed_cnn's fc1, fc2); for a feature map a global
    average with `pool_grid` 1, else an average-pooled `pool_grid` x `pool_grid`
    grid, flattened; for a transformer's tokens [N, T, D] whose first
    `prefix_tokens` are the class token (and registers), the class token, the
    mean of the patch tokens, or both (`token_pool`). Layer names start with `prefix`.
    """
    shape = x.shape
    if len(shape) == 2:
        return x
    if len(shape) == 3:
        if token_pool not in TOKEN_POOLS:
            raise ValueError(f"unknown token_pool {token_pool!r}; valid: {', '.join(TOKEN_POOLS)}")
        mean = keras.layers.GlobalAveragePooling1D(name=prefix + "token_mean")(
            keras.layers.Cropping1D((prefix_tokens, 0), name=prefix + "patch_tokens")(x))
        if not prefix_tokens or token_pool == "mean":
            return mean
        cls = keras.layers.Flatten(name=prefix + "class_token_flat")(
            keras.layers.Cropping1D((0, shape[1] - 1), name=prefix + "class_token")(x))
        if token_pool == "cls":
            return cls
        return keras.layers.Concatenate(name=prefix + "token_pool")([cls, mean])
    if pool_grid == 1:
        return keras.layers.GlobalAveragePooling2D(name=prefix + "avg_pool")(x)
    (window_h, stride_h), (window_w, stride_w) = (
        grid_window(shape[1], pool_grid), grid_window(shape[2], pool_grid))
    x = keras.layers.AveragePooling2D((window_h, window_w), (stride_h, stride_w),
                                      name=prefix + "grid_pool")(x)
    return keras.layers.Flatten(name=prefix + "grid_flatten")(x)


def grid_window(size, grid):
    """(window, stride) with which average pooling turns `size` cells into exactly `grid`.

    Windows overlap where `size` is not a multiple of `grid`; a map smaller
    than the grid stays as it is.
    """
    if size < grid:
        return 1, 1
    stride = size // grid
    return size - (grid - 1) * stride, stride


def load_model(path, compile=False):
    """`keras.saving.load_model(path)`, importing KerasHub first when the model holds
    a KerasHub backbone's layers (`hub:` backbones; their classes register on import)."""
    import importlib.util
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            needs_hub = b"keras_hub" in archive.read("config.json")
    except (OSError, KeyError, zipfile.BadZipFile):
        needs_hub = False  # not a .keras archive: Keras says what it is
    custom_objects = None
    if needs_hub and importlib.util.find_spec("keras_hub") is not None:
        from tl_keras import hub_backbones  # imports keras_hub: its classes register

        custom_objects = hub_backbones.load_fixes()
    return keras.saving.load_model(path, compile=compile, custom_objects=custom_objects)


def save_model(model, path):
    """`model.save(path)` (a .keras file) with any LoRA adapters merged into plain kernels.

    Keras saves a LoRA layer's kernel merged already (`kernel + A @ B x alpha /
    rank`) but keeps `lora_rank` in its config, so loading would add adapters
    again. The file is rewritten without them: it loads as the plain network,
    and a served model holds no LoRA layers.
    """
    model.save(path)
    if not any(getattr(layer, "lora_enabled", False)
               for layer in keras_internals.leaf_layers(model)):
        return
    import json
    import os
    import shutil
    import zipfile

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("lora_rank", "lora_alpha")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    merged = f"{path}.merged"
    try:
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(merged, "w") as target:
            for item in source.infolist():
                data = source.read(item.filename)
                if item.filename == "config.json":
                    data = json.dumps(strip(json.loads(data))).encode()
                target.writestr(item, data)
        shutil.move(merged, path)
    finally:
        if os.path.exists(merged):
            os.remove(merged)
