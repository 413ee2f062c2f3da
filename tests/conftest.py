"""Shared fixtures: tiny configs, tiny image folders, tiny pretend-pretrained weights."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import smoke  # noqa: E402

TINY_BACKBONE = "mobilenet_v3_small"
TINY_SIZE = 32


def tiny_config(tmp_path, regime="small_similar", **overrides):
    """The smoke config, writing into `tmp_path`, quiet."""
    config = smoke.get_config(regime)
    config.workdir = str(tmp_path / "run")
    config.verbose = "0"
    config.augment = False
    config.epochs = 2
    config.head_epochs = 1
    for key, value in overrides.items():
        config[key] = value
    return config


def write_image_folder(root, classes=("cat", "dog", "fox"), per_class=6, size=40, seed=0):
    """A folder dataset of small random images, formats mixed (PNG, JPEG, BMP, GIF)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    encoders = [("png", tf.io.encode_png), ("jpg", tf.io.encode_jpeg)]
    paths = []
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            # Classes differ in brightness, so a head can learn them.
            image = rng.integers(0, 90, (size, size, 3)) + 80 * c
            image = np.clip(image, 0, 255).astype("uint8")
            ext, encode = encoders[i % 2]
            path = root / name / f"{i}.{ext}"
            path.write_bytes(encode(image).numpy())
            paths.append(path)
    from PIL import Image
    Image.fromarray(np.full((size, size, 3), 100, "uint8")).save(root / classes[0] / "x.bmp")
    Image.fromarray(np.full((size, size), 7, "uint8"), mode="L").save(root / classes[1] / "x.gif")
    return paths


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root)
    return root


def tiny_arrays(n=24, num_classes=3, size=TINY_SIZE, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    x = rng.integers(0, 100, (n, size, size, channels)) + 70 * y[:, None, None, None]
    return np.clip(x, 0, 255).astype("uint8"), y.astype("int32")
