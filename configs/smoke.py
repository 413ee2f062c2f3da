"""A run that finishes in seconds: tiny images, random weights, one epoch per phase.

The network is MobileNetV3-Small's minimalistic variant (no squeeze-excite, no
hard-swish): a third fewer layers than MobileNetV3-Small, the same stages, so
every Keras call on it costs less (the fast tests use this config).

For checking an install or a change, not for accuracy. The argument picks
the regime (default small_similar).

Run:
    python tools/finetune.py --config=configs/smoke.py:large_similar --dataset=digits
"""

from tl_keras.configs import base


def get_config(regime="small_similar"):
    config = base.get_config()
    config.regime = regime or "small_similar"
    config.backbone = "mobilenet_v3_small_minimalistic"
    config.weights = "none"
    config.image_size = 32
    config.epochs = 2
    config.head_epochs = 1
    config.batch_size = 16
    config.max_examples = 64
    return config
