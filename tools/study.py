"""Does the rule hold? Every strategy in every quadrant of the regime table (experiments/study.py).

Usage:
    python tools/study.py            # the full study: benchmarks/study/ (about 30 minutes)
    python tools/study.py --quick    # one seed, R1-R4 only, fewer images: about 2 minutes
    python tools/study.py --advisor  # the regime advisor against the study's results
    python tools/study.py --recipe=defaults  # fine-tuning and scratch with configs/base.py's
                                             # recipe: benchmarks/study_recipe/

Pretrains seed_cnn (the regime table's example network) on Fashion-MNIST
classes 0-4, then runs every strategy on a similar and a different target,
small and large, 3 seeds each; writes study.json, table.md, heatmap.png and
the depth curves. Every cell is a run folder under --workdir: a killed study
resumes where it stopped.
"""

import dataclasses
import os
import sys

from absl import flags

import _common
from _common import fail

_common.require_backend()

flags.DEFINE_bool("quick", False, "One seed, R1-R4 only, fewer images and epochs.")
flags.DEFINE_string("out", None, "Results folder (default benchmarks/study, or "
                    "benchmarks/study_quick with --quick).")
flags.DEFINE_string("workdir", None, "Run folders of the cells (default runs/study, or "
                    "runs/study_quick); a killed study resumes from them.")
flags.DEFINE_bool("lite", None, "Also the EfficientNet-Lite0 part (default: not with --quick).")
flags.DEFINE_bool("advisor", False, "Judge the regime advisor against the finished study in "
                  "--out: advice.json and advice.md there (docs/advisor.md).")
flags.DEFINE_enum("recipe", "pinned", ["pinned", "defaults"], "How phases that train the "
                  "backbone train: pinned, the constant rate benchmarks/study was measured "
                  "with; defaults, configs/base.py's recipe (default --out "
                  "benchmarks/study_recipe).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from experiments import study

    suffix = ("_recipe" if FLAGS.recipe == "defaults" else "") + ("_quick" if FLAGS.quick else "")
    settings = study.QUICK if FLAGS.quick else study.FULL
    if FLAGS.recipe == "defaults":
        settings = dataclasses.replace(settings, recipe=study.RECIPE_DEFAULTS)
    from tl_keras import plan

    out = FLAGS.out or f"benchmarks/study{suffix}"
    try:  # both folders checked before the study's half hour, not after
        plan.writable_folder(out, "out")
        plan.writable_folder(FLAGS.workdir or f"runs/study{suffix}", "workdir")
    except ValueError as e:
        fail(_common.first_line(e))
    if FLAGS.advisor and not os.path.isfile(os.path.join(out, "study.json")):
        fail(f"--advisor judges a finished study, and {out!r} holds no study.json: run "
             "python tools/study.py first, or name its results folder with --out")
    try:
        if FLAGS.advisor:
            study.advisor_check(settings,
                                study_dir=FLAGS.out or f"benchmarks/study{suffix}",
                                work_dir=FLAGS.workdir or f"runs/study{suffix}")
            return
        study.run(settings,
                  out_dir=FLAGS.out or f"benchmarks/study{suffix}",
                  work_dir=FLAGS.workdir or f"runs/study{suffix}",
                  lite=not FLAGS.quick if FLAGS.lite is None else FLAGS.lite,
                  command=" ".join(["python", "tools/study.py", *sys.argv[1:]]))
    except ValueError as e:
        fail(_common.first_line(e))


if __name__ == "__main__":
    _common.run(main)
