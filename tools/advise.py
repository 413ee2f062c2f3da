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
advisor and then the advised regime. Errors: one line, exit 2.
"""

import os
import sys
import time

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
    from tl_keras import advise, backbones, plan as plan_lib

    try:
        config = _common.flags_config("runs")
        if not FLAGS.workdir and not FLAGS["config"].value.workdir:
            config.workdir = os.path.join(
                "runs", f"advice_{config.backbone}_{time.strftime('%Y%m%d-%H%M%S')}")
        config.regime = "small_similar"  # any: the advisor only needs the backbone and data
        plan = plan_lib.resolve(config)
        config = plan.config
        if os.path.isdir(config.workdir) and os.listdir(config.workdir):  # nothing overwritten
            fail(f"workdir {config.workdir!r} is not empty; choose another --workdir")
        datasets = _common.load_data(plan, None)
        advice, _ = advise.advise(
            plan, datasets, sample=config.advisor.sample,
            cuts=tuple(FLAGS.cuts or backbones.CUT_POINTS),
            thresholds=advise.Thresholds.from_config(config.advisor),
            verbose=1 if sys.stdout.isatty() else 0)
        print(advise.format_table(advice))
        paths = advise.write(advice, config.workdir)
    except ValueError as e:
        fail(first_line(e))
    except OSError as e:
        fail(first_line(e))
    print("Wrote " + " and ".join(paths))
    flags_ = " ".join(f"--{k}={v}" for k, v in advice.config_overrides().items())
    print(f"Train it: python tools/finetune.py {flags_} --dataset={config.dataset}"
          " (or --regime=auto, which measures again)")


if __name__ == "__main__":
    _common.run(main, flags_parser=_common.parse_config_flags)
