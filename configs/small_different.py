"""Small dataset, unlike ImageNet: keep only the early layers (cut "early"), freeze them, train a new head.

Early features say what is where (edges, textures), not what the object is, so
the head sees them as a 3x3 grid of averages instead of one global average.

Run:
    python tools/finetune.py --regime=small_different --dataset=PATH [--cut=middle]
"""

from tl_keras.configs import base


def get_config():
    config = base.get_config()
    config.regime = "small_different"
    config.epochs = 20  # on cached features an epoch of the head costs about a second
    config.pool_grid = 3
    return config
