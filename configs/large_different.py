"""Large dataset, unlike ImageNet: as large_similar, or from scratch if pretraining does not help.

With `--config.init=scratch` every weight starts random and everything,
BatchNorm included, trains from the first epoch at `learning_rate`.

Run:
    python tools/finetune.py --regime=large_different --dataset=PATH [--config.init=scratch]
"""

from tl_keras.configs import base


def get_config():
    config = base.get_config()
    config.regime = "large_different"
    return config
