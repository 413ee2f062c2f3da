"""Benchmark: cached-feature head training against plain `fit`, and input pipelines against memory.

Usage:
    python tools/benchmark.py                  # small defaults: about 3 minutes on 2 CPU cores
    python tools/benchmark.py --train_examples=2000 --val_examples=2000
    KERAS_BACKEND=jax python tools/benchmark.py --out=benchmarks/results_jax.json

What it measures, side by side in one process (cached features against plain
`fit`, input pipelines against memory, a tuner sweep): experiments/benchmark.py.
Prints a table and writes `--out` (benchmarks/results.json). With
`KERAS_BACKEND=jax` it needs no TensorFlow.
"""

import dataclasses
import json
import os
import sys

from absl import flags

import _common
from experiments import benchmark

_common.require_backend()  # one line, not a traceback, without the backend

for field in dataclasses.fields(benchmark.Settings):  # a flag per setting
    define = flags.DEFINE_integer if field.type is int else flags.DEFINE_string
    define(field.name, field.default, field.metadata["help"])
flags.DEFINE_string("out", "benchmarks/results.json", "Where the results go.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        _common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    settings = benchmark.Settings(**{f.name: getattr(FLAGS, f.name)
                                     for f in dataclasses.fields(benchmark.Settings)})
    # Checked before the work (tens of minutes), not after it.
    for name, valid in (("speed", (0, 1, 2)), ("advisor", (0, 1))):
        if getattr(settings, name) not in valid:
            _common.fail(f"--{name} must be one of {', '.join(map(str, valid))}, "
                         f"got {getattr(settings, name)}")
    for f in dataclasses.fields(benchmark.Settings):
        value = getattr(settings, f.name)
        if f.type is int and value < 0:
            _common.fail(f"--{f.name} must be 0 or more, got {value}")
    if os.path.isdir(FLAGS.out):
        _common.fail(f"--out={FLAGS.out!r} is a folder; name the results file")
    from tl_keras import plan

    try:
        benchmark.check(settings)
        plan.writable_folder(os.path.dirname(os.path.abspath(FLAGS.out)), "out")
    except ValueError as e:
        _common.fail(_common.first_line(e))
    results = benchmark.run(settings, command=" ".join(["python"] + sys.argv))
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print("\n" + benchmark.format_table(results))
    print(f"Results: {FLAGS.out}")


if __name__ == "__main__":
    _common.run(main)
