"""Fine-tune a pretrained backbone in one of the four transfer-learning regimes.

Usage:
    python tools/finetune.py --regime=small_similar --max_examples=2000   # offline default
    python tools/finetune.py --regime=small_similar --dataset=path/to/folder
    python tools/finetune.py --regime=large_similar --dataset=tfds:tf_flowers --epochs=20
    python tools/finetune.py --config=configs/smoke.py:large_different --config.init=scratch
    python tools/finetune.py --regime=small_similar --export_dir=exports/fashion  # + SavedModel

`--regime=R` reads configs/R.py unless `--config` is given; plain flags and
`--config.KEY=VALUE` override it. Errors in flags or data: one line, exit 2.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tl_keras import trainable  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/large_similar.py.")
flags.DEFINE_string("regime", None, f"One of: {', '.join(trainable.REGIMES)}.")
flags.DEFINE_string("backbone", None, "A backbone name, e.g. efficientnet_lite0, resnet50.")
flags.DEFINE_string("dataset", None, "fashion_mnist, digits, a folder of class subfolders or tfds:NAME.")
flags.DEFINE_string("weights", None, "imagenet | none | PATH.weights.h5")
flags.DEFINE_string("init", None, "pretrained | scratch (large regimes)")
flags.DEFINE_string("cut", None, "early | middle | late | top | a layer name")
flags.DEFINE_integer("image_size", None, "Input height and width (0: the backbone's default).")
flags.DEFINE_integer("epochs", None, "Total epochs, across phases.")
flags.DEFINE_integer("batch_size", None, "Batch size.")
flags.DEFINE_float("learning_rate", None, "Learning rate of the head phase.")
flags.DEFINE_integer("max_examples", None, "Cap on training examples (0: all).")
flags.DEFINE_integer("examples_per_class", None, "Cap on training examples per class (0: all).")
flags.DEFINE_integer("seed", None, "Random seed.")
flags.DEFINE_integer("pool_grid", None, "Head input: 1 global average, g a g x g grid of averages.")
flags.DEFINE_bool("cache_features", None, "Frozen backbone: train the head on features computed once.")
flags.DEFINE_integer("cached_views", None, "Augmented views cached per training image.")
flags.DEFINE_string("workdir", None, "Run folder (default runs/<regime>_<backbone>_<time>).")
flags.DEFINE_bool("strict", None, "Fail on an undecodable image instead of skipping it.")
flags.DEFINE_string("mixed_precision", None, "mixed_float16 | mixed_bfloat16")
flags.DEFINE_bool("jit_compile", None, "Compile with XLA.")
flags.DEFINE_string("export_dir", None, "Also export the final model for TF Serving as "
                    "EXPORT_DIR/<next version>/ (see tools/export.py).")
FLAGS = flags.FLAGS

_PLAIN = ("regime", "backbone", "dataset", "weights", "init", "cut", "image_size", "epochs",
          "batch_size", "learning_rate", "max_examples", "examples_per_class", "seed", "workdir",
          "strict", "pool_grid", "cache_features", "cached_views", "mixed_precision",
          "jit_compile")


def fail(message):
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl parsing with the regime's config file as the default --config."""
    argv = list(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        regime = "small_similar"
        for i, a in enumerate(argv):
            if a.startswith("--regime="):
                regime = a.split("=", 1)[1]
            elif a == "--regime" and i + 1 < len(argv):
                regime = argv[i + 1]
        if regime not in trainable.REGIMES:
            fail(f"unknown regime {regime!r}; valid regimes: {', '.join(trainable.REGIMES)}")
        argv.insert(1, f"--config={os.path.join(CONFIGS, regime + '.py')}")
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0])
    except AttributeError as e:  # ml_collections: --config.KEY for a KEY the config lacks
        fail(f"unknown config key {str(e).strip(chr(34))} (every key is in configs/base.py)")
    except (KeyError, TypeError, ValueError) as e:
        fail(f"bad --config value: {str(e).splitlines()[0]}")


def resolved_config():
    config = FLAGS.config
    for name in _PLAIN:
        value = getattr(FLAGS, name)
        if value is not None:
            config[name] = value
    if not config.workdir:
        config.workdir = os.path.join(
            "runs", f"{config.regime}_{config.backbone}_{time.strftime('%Y%m%d-%H%M%S')}")
    return config


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from tl_keras import data, export, train

    config = resolved_config()
    try:
        config = train.resolve(config)
        if FLAGS.export_dir:  # checked before training, not after
            export.check_export_dir(FLAGS.export_dir)
        print(f"Run folder: {config.workdir}")
        datasets = data.load(config, image_size=config.image_size)
        print(f"Data: {datasets.train_examples} training and {datasets.val_examples} "
              f"validation images, {len(datasets.class_names)} classes, "
              f"{config.image_size}px")
        metrics = train.finetune(config, datasets)
    except ValueError as e:
        fail(str(e).splitlines()[0])
    print(f"Run folder: {config.workdir}")
    print(f"val_accuracy: {metrics['val_accuracy']:.4f}  val_loss: {metrics['val_loss']:.4f}  "
          f"({metrics['epochs_run']} epochs, {metrics['wall_seconds']:.0f} s)")
    if FLAGS.export_dir:
        try:
            export.export_run(config.workdir, FLAGS.export_dir)
        except ValueError as e:
            fail(f"{str(e).splitlines()[0]} (the run is complete in {config.workdir}; "
                 "export it later with tools/export.py)")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
