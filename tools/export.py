"""Export a finished run as a SavedModel for TF Serving.

Usage:
    python tools/export.py --workdir=runs/small_similar_... --export_dir=exports/fashion

Writes the next free version `export_dir/<n>/` (never overwriting one) with the
signatures `serving_default` (float32 pixels) and `serve_bytes` (encoded
images); see tl_keras/export.py. Errors: one line, exit 2.
"""

from absl import app, flags

import _common
from _common import fail, first_line

_common.require_backend()  # one line, not a traceback, without TensorFlow

flags.DEFINE_string("workdir", None, "A finished run folder (holds model.keras and metrics.json).")
flags.DEFINE_string("export_dir", None, "The model's base directory for TF Serving.")
FLAGS = flags.FLAGS


def parse_flags(argv):
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(first_line(e))


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    for name in ("workdir", "export_dir"):
        if not getattr(FLAGS, name):
            fail(f"--{name} is required")
    from tl_keras import export

    try:
        export.export_run(FLAGS.workdir, FLAGS.export_dir)
    except ValueError as e:
        fail(first_line(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
