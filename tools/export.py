"""Export a finished run: a SavedModel for TF Serving, or a LiteRT model for phones.

Usage:
    python tools/export.py --workdir=runs/small_similar_... --export_dir=exports/fashion
    python tools/export.py --workdir=RUN --export_dir=exports/fashion_lite --format=litert \
        --quantize=int8          # none | float16 | dynamic | int8 | int16x8

Writes the next free version `export_dir/<n>/` (never overwriting one). A
SavedModel has the signatures `serving_default` (float32 pixels) and
`serve_bytes` (encoded images); see tl_keras/export.py. A LiteRT model is
measured against the Keras model on the validation split and written with
labels.txt and export.json; see tl_keras/litert.py. Errors: one line, exit 2.
"""

from absl import flags

import _common
from _common import fail, first_line

_common.require_backend()  # one line, not a traceback, without TensorFlow

flags.DEFINE_string("workdir", None, "A finished run folder (holds model.keras and metrics.json).")
flags.DEFINE_string("export_dir", None, "The model's base directory (TF Serving's, or any).")
flags.DEFINE_enum("format", "saved_model", ["saved_model", "litert"], "What to export.")
flags.DEFINE_enum("quantize", "int8", ["none", "float16", "dynamic", "int8", "int16x8"],
                  "LiteRT: float32, float16 weights, int8 weights, full integer int8, or "
                  "int8 weights with int16 activations (int8 and int16x8 calibrated on the "
                  "run's own training images).")
flags.DEFINE_integer("calibration_images", 300, "LiteRT int8, int16x8: training images to "
                     "calibrate on.")
flags.DEFINE_integer("eval_images", 0, "LiteRT: validation images to measure on (0: all).")
flags.DEFINE_float("min_agreement", 0.95, "LiteRT: the least top-1 agreement with the Keras "
                   "model on the validation images; below it nothing is written.")
flags.DEFINE_float("max_accuracy_drop", 0.01, "LiteRT: the most validation accuracy the "
                   "model may lose against the Keras model (0.01: 1 point); more: nothing is "
                   "written.")
flags.DEFINE_bool("int8_float_fallback", True, "LiteRT int8 that misses the bars: convert "
                  "again with its most sensitive layers in float (false: refuse; for "
                  "integer-only accelerators).")
flags.DEFINE_float("max_int8_size", 0.35, "LiteRT int8 with float layers: the largest file, "
                   "as a share of the float32 conversion's; larger is refused.")
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
    for name, low in (("calibration_images", 1), ("eval_images", 0)):
        if getattr(FLAGS, name) < low:
            fail(f"--{name} must be {'at least 1' if low else '0 (all) or more'}, "
                 f"got {getattr(FLAGS, name)}")
    for name in ("min_agreement", "max_accuracy_drop", "max_int8_size"):
        if not 0 <= getattr(FLAGS, name) <= 1:
            fail(f"--{name} must be in [0, 1], got {getattr(FLAGS, name)}")
    import tensorflow as tf

    from tl_keras import export, litert

    try:
        if FLAGS.format == "litert":
            litert.export_run(FLAGS.workdir, FLAGS.export_dir, FLAGS.quantize,
                              calibration_count=FLAGS.calibration_images,
                              eval_images=FLAGS.eval_images, min_agreement=FLAGS.min_agreement,
                              max_drop=FLAGS.max_accuracy_drop,
                              float_fallback=FLAGS.int8_float_fallback,
                              max_size=FLAGS.max_int8_size)
        else:
            export.export_run(FLAGS.workdir, FLAGS.export_dir)
    except (ValueError, OSError) as e:
        fail(first_line(e))
    except tf.errors.OpError as e:  # e.g. a full disk while TensorFlow writes the SavedModel
        if "No space left" in str(e.message):  # TensorFlow's text names its own temp files
            fail(f"no space left on device writing {FLAGS.export_dir} (no version was "
                 "published)")
        fail(f"{type(e).__name__}: {first_line(e.message)} (no version was published)")


if __name__ == "__main__":
    _common.run(main, flags_parser=parse_flags)
