"""Evaluate a finished run: per-class scores, confusion, calibration, its worst mistakes.

Usage:
    python tools/evaluate.py --workdir=runs/small_similar_...           # its validation split
    python tools/evaluate.py --workdir=RUN --dataset=path/to/test_images --tta=flip
    python tools/evaluate.py --workdir=RUN --model=best                 # best.keras

Writes RUN/eval/ (eval.json, confusion.png, reliability.png, mistakes.png; a multi-label
run: eval.json with mAP, F1 and per-label thresholds, and thresholds.json for predict.py)
and RUN/report.html again, with the evaluation; nothing else of the run changes
(tl_keras/evaluate.py). Errors: one line, exit 2.
"""

from absl import flags

import _common
from _common import fail, first_line

_common.require_backend()

flags.DEFINE_string("workdir", None, "The run folder tools/finetune.py wrote.")
flags.DEFINE_string("dataset", None, "Evaluate on this instead of the run's validation split: "
                    "a folder (all of it), a built-in name or tfds:NAME (its validation split).")
flags.DEFINE_enum("tta", "none", ["none", "flip"], "Test-time augmentation, reported beside "
                  "the plain numbers: flip averages each image's and its mirror image's "
                  "probabilities.")
flags.DEFINE_integer("top_k", 5, "k of the top-k accuracy.")
flags.DEFINE_enum("model", "model", ["model", "best"], "model.keras (the final model, as "
                  "metrics.json) or best.keras.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        fail("--workdir is required: the run folder tools/finetune.py printed")
    from tl_keras import api, evaluate

    try:
        result = api.evaluate_run(FLAGS.workdir, dataset=FLAGS.dataset, tta=FLAGS.tta,
                                  top_k=FLAGS.top_k, which=FLAGS.model).result
    except (ValueError, OSError) as e:
        fail(first_line(e))
    print(evaluate.format_summary(result))
    print(f"Wrote {FLAGS.workdir}/eval/ and {FLAGS.workdir}/report.html")


if __name__ == "__main__":
    _common.run(main)
