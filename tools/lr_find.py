"""Which learning rate? The range test (Smith 2017; fastai's lr_find): trains one
phase for a few batches at rates rising from --min_rate to --max_rate, draws the
loss against the rate, and suggests a tenth of the rate where the loss was lowest
(tl_keras/lr_find.py).

Usage:
    python tools/lr_find.py --regime=large_similar --dataset=PATH
    python tools/lr_find.py --regime=small_similar --dataset=digits --phase=head

The phase defaults to the regime's last (large regimes: `finetune`, whose rate is
`finetune_learning_rate`). Writes lr_find.json and lr_find.png to --workdir
(default runs/lr_find_<backbone>_<time>); no weights are kept. Errors: one line,
exit 2. From Python: `tl_keras.find_learning_rate(dataset, regime=...)`.
"""

import sys

from absl import flags

import _common
from _common import fail, first_line

_common.require_backend()

_common.define_config_flags(
    workdir_help="Where lr_find.json and lr_find.png go (default runs/lr_find_<backbone>_<time>).")
flags.DEFINE_string("phase", None, "The phase to test: head, finetune or scratch "
                    "(default: the regime's last).")
flags.DEFINE_integer("steps", 100, "Rates tried (one batch each).", lower_bound=5)
flags.DEFINE_float("min_rate", 1e-7, "The lowest rate tried.")
flags.DEFINE_float("max_rate", 1.0, "The highest rate tried.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from tl_keras import api

    try:
        result = api.find_learning_rate_config(
            _common.flags_config("runs", prefix="lr_find"), FLAGS.phase, FLAGS.steps,
            FLAGS.min_rate, FLAGS.max_rate)
    except (ValueError, OSError) as e:
        fail(first_line(e))
    print("Wrote " + " and ".join(result.paths))
    rate = {"regime": FLAGS.config.regime,
            f"config.{result.key}": f"{result.test.suggestion:.2g}"}
    print(f"Train with it: {_common.finetune_command(sys.argv, _MEASURING, rate)}")


# lr_find.py's own flags, and its folder: not a run's.
_MEASURING = {"phase", "steps", "min_rate", "max_rate", "workdir"}


if __name__ == "__main__":
    _common.run(main, flags_parser=_common.parse_config_flags)
