"""Which regime fits this dataset? Measures its size and its similarity to the
backbone's pretraining data, and says (tl_keras/advise.py, docs/advisor.md).

Usage:
    python tools/advise.py --dataset=path/to/folder
    python tools/advise.py --dataset=digits --backbone=efficientnet_lite0
    python tools/advise.py --dataset=PATH --cuts=early,late,block6a_expand_activation

Scores the backbone's features at every named cut (LogME, H-score beside it),
pretrained and at random init, on a seeded sample of the training images;
prints the table, the advised regime and cut and why; writes advice.json and
advice.png to --workdir. `tools/finetune.py --regime=auto` runs the same
advisor and then the advised regime. Errors: one line, exit 2. From Python:
`tl_keras.advise_regime(dataset, **config)` (tl_keras/api.py).
"""

import sys

from absl import flags

import _common
from _common import fail, first_line

_common.require_backend()

_common.define_config_flags(
    workdir_help="Where advice.json and advice.png go (default runs/advice_<backbone>_<time>).")
flags.DEFINE_list("cuts", None, "Cuts to score: named cut points and/or layer names "
                  "(default early,middle,late,top).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from tl_keras import api

    try:
        result = api.advise_config(_common.flags_config("runs", prefix="advice"), FLAGS.cuts)
    except (ValueError, OSError) as e:
        fail(first_line(e))
    advice = result.advice
    print("Wrote " + " and ".join(result.paths))
    print(f"Train it: {train_command(sys.argv, advice)} (or --regime=auto, which measures again)")


# Flags the advice decides (or that only the advice takes): replaced in the command it prints.
_ADVISED = {"regime", "cut", "init", "pool_grid", "backbone", "workdir", "cuts"}


def train_command(argv, advice):
    """The tools/finetune.py command that trains what was measured: this command's own
    flags, with the ones the advice decides replaced by its decision and the backbone
    it advised on."""
    return _common.finetune_command(
        argv, _ADVISED, {**advice.config_overrides(), "backbone": advice.backbone})


if __name__ == "__main__":
    _common.run(main, flags_parser=_common.parse_config_flags)
