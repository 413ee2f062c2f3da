"""Large dataset, similar to ImageNet: train a new head, then retrain everything at a low rate.

Phase 1 trains the head alone for `head_epochs`; phase 2 unfreezes the
backbone (BatchNorm stays frozen) and trains everything until `epochs` with
configs/base.py's recipe: AdamW, a cosine schedule from a peak of
`finetune_learning_rate` after a 10% warm-up, gradients clipped at norm 1
(tl_keras/recipe.py).

Run:
    python tools/finetune.py --regime=large_similar --dataset=PATH
"""

from tl_keras.configs import base


def get_config():
    config = base.get_config()
    config.regime = "large_similar"
    return config
