"""KerasHub image backbones as tl_keras backbones: `--backbone=hub:PRESET`.

`PRESET` is a KerasHub preset name (`dinov2_small`, `resnet_50_imagenet`,
`vit_base_patch16_224_imagenet`: downloaded from Kaggle, so network is needed
once) or a preset folder (`hub:/path/to/preset`, written by
`Backbone.save_to_preset`). The entry is read from the preset itself:

- the network: `keras_hub.models.Backbone.from_preset`, at `--image_size`
  (the preset's own size when 0); `weights=imagenet` means the preset's
  weights, `none` the same architecture at random init;
- the pixels: the preset's image converter (`image_converter.json`) scales
  and offsets each channel, an affine map the model's `preprocess` layer
  takes over (resizing is the data pipeline's); a preset without one: / 255;
- the cuts: from the stages the model publishes (`pyramid_outputs`). A CNN's
  levels P2..P5: `early` P2 (stride 4), `middle` P3, `late` P4; a
  transformer's blocks stage1..stageN: `early` at about N/4, `middle` N/2,
  `late` 3N/4; `top` is the model's output. Any published stage ("P3",
  "stage7") or layer name is a cut as well.

KerasHub is an optional dependency (see the README for installing it beside
tensorflow-cpu); without it `hub:` is one line naming the install.

Example:
    cut = backbones.build_backbone("hub:/tmp/dinov2_tiny", weights="none", cut="middle")
"""

import functools
import math
import os

import keras
import numpy as np

from tl_keras import backbones, keras_internals

INSTALL = ('pip install --no-deps "keras-hub==0.32.0" && pip install -e ".[hub]" '
           "(keras-hub's own requirements would install a second TensorFlow; README)")


def keras_hub():
    """The keras_hub module, or a `ValueError` naming the install."""
    try:
        import keras_hub as module
    except ImportError as e:
        raise ValueError(f"--backbone=hub:... needs KerasHub ({e}): {INSTALL}") from None
    return module


@functools.cache
def entry(preset):
    """The `backbones.Backbone` entry of KerasHub `preset` (built once per process)."""
    original = load(preset, load_weights=False)
    image_size = _image_size(original)
    tokens = prefix_tokens(original, image_size)
    probe = staged(original)
    stages = list(getattr(probe, "pyramid_outputs", None) or {})
    scale, offset = converter(preset)

    def preprocess_input(x, data_format=None):
        del data_format
        return x * scale + offset

    def build(name, weights, size):
        return _build(preset, name, weights, size)

    return backbones.Backbone(build, preprocess_input, image_size, named_cuts(probe, stages),
                              offline=os.path.isdir(preset), prefix_tokens=tokens)


def load(preset, load_weights=True, image_size=None):
    """`keras_hub.models.Backbone.from_preset`, each failure one `ValueError`."""
    hub = keras_hub()
    kwargs = {"image_shape": (image_size, image_size, 3)} if image_size else {}
    try:
        return hub.models.Backbone.from_preset(preset, load_weights=load_weights, **kwargs)
    except Exception as e:  # noqa: BLE001 (kagglehub, network, file and config errors)
        where = ("a preset folder" if os.path.isdir(preset) else
                 "a KerasHub preset name (downloaded from Kaggle: network needed once) "
                 "or a folder save_to_preset wrote")
        raise ValueError(f"could not load KerasHub preset {preset!r} as an image backbone "
                         f"({backbones._first_line(e)}); --backbone=hub:PRESET takes {where}"
                         ) from None


def converter(preset):
    """(scale, offset) per channel of the preset's image converter; (1/255, 0) without one."""
    hub = keras_hub()
    try:
        layer = hub.layers.ImageConverter.from_preset(preset)
    except Exception:  # noqa: BLE001 (a preset without image_converter.json)
        layer = None
    scale = getattr(layer, "scale", None)
    offset = getattr(layer, "offset", None)
    scale = 1 / 255 if scale is None else scale
    offset = 0.0 if offset is None else offset
    return (np.broadcast_to(np.asarray(scale, "float32"), (3,)).copy(),
            np.broadcast_to(np.asarray(offset, "float32"), (3,)).copy())


def prefix_tokens(model, image_size):
    """Tokens before the patch tokens of a transformer's output (0 for a CNN's feature map)."""
    shape = model.output.shape
    patch = model.get_config().get("patch_size")
    if len(shape) != 3 or not patch:
        return 0
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return max(0, int(shape[1]) - (image_size // int(patch)) ** 2)


def _image_size(model):
    shape = backbones.image_input(model).shape
    return int(shape[1]) if shape[1] else 224


def named_cuts(model, stages):
    """{early, middle, late, top: the layer or stage that ends it} from the published stages.

    A stage that one top-level layer of `model` outputs is named by that layer
    (so unfreezing and layer-wise rates find it among the layers); a stage
    inside a layer (a transformer's encoder) keeps its stage name.
    """
    levels = [s for s in stages if s.startswith("P") and s[1:].isdigit()]
    blocks = [s for s in stages if s.startswith("stage") and s[5:].isdigit()]
    if not stages:  # no published stages: a transformer whose blocks are its own layers
        blocks = numbered_blocks(model)
    if levels:
        levels.sort(key=lambda s: int(s[1:]))
        chosen = [f"P{n}" if f"P{n}" in levels else levels[min(i, len(levels) - 1)]
                  for i, n in enumerate((2, 3, 4))]
    elif blocks:
        blocks.sort(key=lambda s: int(s.rpartition("_")[2] if "_" in s else s[5:]))
        n = len(blocks)
        chosen = [blocks[max(1, math.ceil(n * f)) - 1] for f in (0.25, 0.5, 0.75)]
    else:
        chosen = []
    top = model.layers[-1].name
    named = [_layer_of(model, s) if s in stages else s for s in chosen]
    cuts = dict(zip(backbones.CUT_POINTS[:-1], named))
    cuts["top"] = top
    return cuts


def numbered_blocks(model):
    """The names of `model`'s top-level layers `<prefix>_0`, `<prefix>_1`, ... in order,
    for the prefix most of them share (SigLIP's encoder_block_k), or []."""
    numbered = {}
    for layer in model.layers:
        prefix, _, number = layer.name.rpartition("_")
        if prefix and number.isdigit():
            numbered.setdefault(prefix, []).append(layer.name)
    longest = max(numbered.values(), key=len, default=[])
    return longest if len(longest) >= 2 else []


def _layer_of(model, stage):
    tensor = model.pyramid_outputs[stage]
    operation = keras_internals.producer(tensor)
    if operation in model.layers and not isinstance(operation.output, (list, tuple, dict)):
        return operation.name
    return stage


def _build(preset, name, weights, size):
    if weights not in ("imagenet", "none", None):
        backbones.check_weights(weights)
    model = load(preset, load_weights=weights == "imagenet", image_size=size)
    if weights not in ("imagenet", "none", None):
        backbones.load_weights(model, name, weights)
    for variable in model.weights:  # used only for masked-image pretraining (DINOv2, BEiT)
        if variable.path.endswith("mask_token"):
            variable.trainable = False
    return staged(model)


def staged(model):
    """`model` with its encoder's blocks as its own layers and published as stages
    (`pyramid_outputs` stage1..stageN), where KerasHub keeps them inside one layer and
    publishes none (ViT); other models as they are.

    The same layers and weights, called one by one as the encoder calls them
    (dropout, the blocks, the final LayerNormalization), so the output is the
    model's own.
    """
    encoder = next((layer for layer in model.layers if type(layer).__name__ == "ViTEncoder"),
                   None)
    if encoder is None or getattr(model, "pyramid_outputs", None):
        return model
    x = encoder.dropout(encoder.input)
    stages = {}
    for i, block in enumerate(encoder.encoder_layers, start=1):
        x = stages[f"stage{i}"] = block(x)
    out = keras.Model(backbones.image_input(model), encoder.layer_norm(x), name=model.name)
    out.pyramid_outputs = stages
    return out


# KerasHub 0.32 layers whose get_config() returns keys their constructor refuses: outside
# their backbone (whose own config rebuilds them) they cannot be deserialised.
_EXTRA_CONFIG_KEYS = {"ViTPatchingAndEmbedding": ("num_patches", "num_positions"),
                      "ViTEncoderBlock": ("key_dim",)}


def load_fixes():
    """custom_objects that let a model holding KerasHub layers load again (model.load_model):
    each layer of `_EXTRA_CONFIG_KEYS` deserialised without those keys (derived from the
    others)."""
    from keras_hub.src.models.vit import vit_layers

    def tolerant(cls, extra):
        class Tolerant(cls):
            @classmethod
            def from_config(klass, config):
                return cls.from_config({k: v for k, v in config.items() if k not in extra})

        return Tolerant

    return {name: tolerant(getattr(vit_layers, name), extra)
            for name, extra in _EXTRA_CONFIG_KEYS.items()}
