"""Small dataset, similar to ImageNet: cut the classifier off, freeze the backbone, train a new head.

Run:
    python tools/finetune.py --regime=small_similar --dataset=PATH
"""

from tl_keras.configs import base


def get_config():
    config = base.get_config()
    config.regime = "small_similar"
    config.epochs = 20  # on cached features an epoch of the head costs about a second
    return config
