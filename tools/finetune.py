"""Fine-tune a pretrained backbone in one of the four transfer-learning regimes.

Usage:
    python tools/finetune.py --regime=small_similar --max_examples=2000   # offline default
    python tools/finetune.py --regime=small_similar --dataset=path/to/folder
    python tools/finetune.py --regime=large_similar --dataset=tfds:tf_flowers --epochs=20
    python tools/finetune.py --regime=auto --dataset=path/to/folder  # the advisor decides
    python tools/finetune.py --config=configs/smoke.py:large_different --config.init=scratch
    python tools/finetune.py --regime=small_similar --export_dir=exports/fashion  # + SavedModel
    python tools/finetune.py --regime=large_similar --distribution=mirrored  # every GPU here
    TF_CONFIG='{...}' python tools/finetune.py --distribution=multi_worker    # each host (docs/scaling_out.md)

`--regime=R` reads configs/R.py unless `--config` is given; plain flags and
`--config.KEY=VALUE` override it. Errors in flags or data: one line, exit 2.
From Python: `tl_keras.finetune(dataset, regime=..., **config)` runs the same (tl_keras/api.py).
"""

import errno

from absl import flags

import _common
from _common import fail, first_line

_common.require_backend()  # one line, not a traceback, without TensorFlow

_common.define_config_flags()
flags.DEFINE_string("export_dir", None, "Also export the final model as "
                    "EXPORT_DIR/<next version>/ (see tools/export.py).")
flags.DEFINE_enum("export_format", "saved_model", ["saved_model", "litert"],
                  "With --export_dir: a SavedModel for TF Serving, or LiteRT.")
flags.DEFINE_enum("export_quantize", "int8", ["none", "float16", "dynamic", "int8", "int16x8"],
                  "With --export_format=litert: see tools/export.py --quantize.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from tl_keras import api, distribute

    try:
        run = api.finetune_config(_common.flags_config("runs"), _common.given_keys_or_none(),
                                  FLAGS.export_dir, FLAGS.export_format, FLAGS.export_quantize)
    except api.PeerFailure as e:  # a dead peer: rejoin the cluster afresh (replaces this process)
        try:
            distribute.restart(e.__cause__)
        except RuntimeError as gave_up:
            fail(first_line(gave_up))
    except ValueError as e:
        fail(first_line(e))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # files are written whole or not at all
            fail(f"{first_line(e)} (nothing is half-written; the same command resumes the run)")
        fail(first_line(e))
    if not run.chief:
        print(f"Done; the chief wrote the run folder {run.workdir}")
        return
    metrics = run.metrics
    print(f"Run folder: {run.workdir}")
    print(f"{run.monitor}: {metrics[run.monitor]:.4f}  val_loss: {metrics['val_loss']:.4f}  "
          f"({metrics['epochs_run']} epochs, {metrics['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    _common.run(main, flags_parser=_common.parse_config_flags, resumable=True)
