"""Small dataset, unlike ImageNet: keep only the early layers (cut "early"), freeze them, train a new head.

Run:
    python tools/finetune.py --regime=small_different --dataset=PATH [--cut=middle]
"""

from configs import base


def get_config():
    config = base.get_config()
    config.regime = "small_different"
    return config
