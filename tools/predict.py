"""Classify image files or folders with a finished run or an exported SavedModel; CSV out.

Usage:
    python tools/predict.py --workdir=runs/small_similar_... photo.jpg more_photos/
    python tools/predict.py --saved_model=exports/fashion new/ --top_k=3 --out=predictions.csv
    python tools/predict.py --workdir=RUN --strict images/      # an undecodable file fails

Writes one row per image -- path, class_1, probability_1, ..., class_k,
probability_k -- to stdout or --out (never overwritten). Images are decoded and
resized as training did (tl_keras/predict.py); an undecodable file is skipped
and counted on stderr, or with --strict an error. Errors: one line, exit 2.
"""

import io
import os
import sys

from absl import flags

import _common
from _common import fail, first_line

_common.require_backend()

flags.DEFINE_string("workdir", None, "A finished run folder (its model.keras).")
flags.DEFINE_string("saved_model", None, "Or an export folder of tools/export.py (its highest "
                    "version, or a version folder).")
flags.DEFINE_enum("model", "model", ["model", "best"], "With --workdir: model.keras or "
                  "best.keras.")
flags.DEFINE_integer("top_k", 5, "Classes per image, most probable first.")
flags.DEFINE_string("out", None, "Write the CSV here (a new file) instead of stdout.")
flags.DEFINE_bool("strict", False, "Fail on an undecodable file instead of skipping it.")
FLAGS = flags.FLAGS


def main(argv):
    inputs = argv[1:]
    if not inputs:
        fail("name image files or folders to classify")
    if bool(FLAGS.workdir) == bool(FLAGS.saved_model):
        fail("give one of --workdir (a run folder) or --saved_model (an export folder)")
    if FLAGS.top_k < 1:
        fail(f"top_k must be at least 1, got {FLAGS.top_k}")
    if FLAGS.out and os.path.exists(FLAGS.out):
        fail(f"{FLAGS.out!r} exists; choose another --out (nothing is overwritten)")
    from tl_keras import api, predict, run_folder

    try:
        found = api.classify(FLAGS.workdir or FLAGS.saved_model, inputs, FLAGS.top_k,
                             FLAGS.strict, FLAGS.model, saved_model=bool(FLAGS.saved_model))
        if FLAGS.out:
            text = io.StringIO()
            found.to_csv(text)
            run_folder.write_text(FLAGS.out, text.getvalue())
        else:
            found.to_csv(sys.stdout)
    except (ValueError, OSError) as e:
        fail(first_line(e))
    predict.report_skipped(found.skipped, len(found.rows) + len(found.skipped))
    print(f"Classified {len(found.rows)} images with {found.source}"
          f"{f'; wrote {FLAGS.out}' if FLAGS.out else ''}", file=sys.stderr)


if __name__ == "__main__":
    _common.run(main)
