"""Sweep a regime's hyperparameters with Keras Tuner; retrain the winner with one command.

Usage:
    python tools/tune.py --regime=small_similar --max_examples=2000 --max_trials=10 \
        --workdir=sweeps/fashion
    python tools/tune.py --regime=large_similar --tuner=hyperband --epochs=9 --dataset=PATH
    python tools/tune.py --regime=auto --dataset=PATH   # sweeps the regime the advisor picks
    python tools/finetune.py --config=sweeps/fashion/best_config.py --export_dir=exports/best

Takes finetune.py's flags (`--regime`, `--config`, `--dataset`, `--backbone`,
`--weights`, ...): they set the sweep's base config, and each trial changes the
regime's hyperparameters (tl_keras/tune.py). A sweep re-run with the same
`--workdir` continues where it stopped. Prints the trials best first and
writes WORKDIR/tuning.csv and WORKDIR/best_config.py.

Distributed (Keras Tuner's chief / worker mode): run the same command on every
machine with KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT (the chief's
address) and KERASTUNER_TUNER_ID=chief on the chief, tuner0, tuner1, ... on the
workers. The chief serves the oracle and reports; the workers run trials.
`--distribution=mirrored` (or auto with 2+ GPUs) trains each trial on every
GPU of its machine.

Errors in flags, data or the oracle's address: one line, exit 2.
"""

import os

from absl import flags

import _common
from _common import fail

_common.require_backend()  # one line, not a traceback, without TensorFlow

_common.define_config_flags(workdir_help="Sweep folder (default sweeps/<regime>_<backbone>_<time>); "
                                         "an unfinished sweep there resumes.")
flags.DEFINE_string("tuner", "random", "random | hyperband | bayesian")
flags.DEFINE_integer("max_trials", 10, "Trials in all, earlier attempts included.")
flags.DEFINE_float("oracle_wait", 120.0, "Worker: seconds to wait for the chief's oracle to answer.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from tl_keras import prepare, tune

    try:
        role = tune.role()  # checks the KERASTUNER_* variables
        config = _common.flags_config("sweeps")
        if config.distribution == "multi_worker":
            raise ValueError("--distribution=multi_worker trains one run across hosts; a sweep "
                             "spreads its trials over hosts with KERASTUNER_* variables "
                             "(docs/tuning.md)")

        def check_sweep(plan, strategy):
            tune.check_sweep(FLAGS.tuner, plan, FLAGS.max_trials, plan.config.workdir)

        def before_data(plan, strategy):
            if role == "chief":
                tune.check_oracle_port()
            elif role == "worker":
                tune.wait_for_oracle(FLAGS.oracle_wait)
            print(f"Sweep folder: {plan.config.workdir} ({FLAGS.tuner}, up to "
                  f"{FLAGS.max_trials} trials{', ' + tune.tuner_id() if role != 'single' else ''})")

        # Trials run under the strategy; with --regime=auto the sweep's regime is the advised one.
        ready = prepare.prepare(config, _common.given_keys_or_none(), on_plan=check_sweep,
                                before_data=before_data)
        plan = ready.plan
        workdir = plan.config.workdir
        tuner = tune.make_tuner(FLAGS.tuner, plan, ready.datasets, FLAGS.max_trials, workdir,
                                ready.strategy)
        if role != "worker":
            earlier = sum(t.status == "COMPLETED" for t in tuner.oracle.trials.values())
            if earlier:
                print(f"{earlier} trial(s) finished in an earlier attempt; they are not rerun.")
    except ValueError as e:
        fail(_common.first_line(e))
    except OSError as e:
        fail(_common.first_line(e))
    import tensorflow as tf

    try:
        tuner.search()
    except RuntimeError as e:  # Keras Tuner: too many trials failed in a row
        stopped = _common.first_line(e)
    except (OSError, tf.errors.ResourceExhaustedError) as e:  # e.g. a full disk
        fail(f"{_common.first_line(e)} (finished trials are kept; the same command resumes "
             "the sweep)")
    else:
        stopped = None
    if role == "worker":
        if stopped:
            fail(stopped)
        print(f"Worker {tune.tuner_id()}: no trials left.")
        return
    rows = tune.write_results(tuner, plan, workdir)
    print(tune.format_table(rows))
    if stopped:
        fail(f"{stopped} (the trials' errors are above and in tuning.csv)")
    best = os.path.join(workdir, "best_config.py")
    print(f"Trials: {os.path.join(workdir, 'tuning.csv')}")
    if os.path.exists(best):
        print(f"Best config: {best}\nRetrain and export it with:\n"
              f"    python tools/finetune.py --config={best} --export_dir=exports/best")


if __name__ == "__main__":
    _common.run(main, flags_parser=_common.parse_config_flags, resumable=True)
