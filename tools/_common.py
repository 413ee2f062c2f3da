"""What the tools share: one-line errors, and the config flags of finetune.py, advise.py
and tune.py. Everything else a tool does is a call into tl_keras (tl_keras/api.py).

`define_config_flags()` defines `--config` (a config file, default
configs/<regime>.py), `--config.KEY=VALUE` overrides, and a plain flag for
each common key (`--regime`, `--backbone`, `--dataset`, ...).
"""

import atexit
import gc
import os
import shlex
import signal
import sys

import ml_collections
from absl import app, flags

import tl_keras
import tl_keras.configs

CONFIGS = os.path.dirname(tl_keras.configs.__file__)  # the repository's configs/
# experiments/ (the study's and the benchmark's drivers) is not installed with tl_keras:
# the tools that run them import it from the checkout they are in.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = flags.FLAGS

# Plain flags: name -> (type, help). Each, when given, overrides config.<name>.
CONFIG_FLAGS = {
    "regime": (str, "small_similar | small_different | large_similar | large_different | "
                    "auto (measured by the regime advisor, docs/advisor.md)"),
    "backbone": (str, "A backbone name, e.g. efficientnet_lite0, resnet50."),
    "dataset": (str, "fashion_mnist, digits, a folder of class subfolders or tfds:NAME."),
    "weights": (str, "imagenet | none | PATH.weights.h5"),
    "init": (str, "pretrained | scratch (large regimes)"),
    "cut": (str, "early | middle | late | top | a layer name"),
    "image_size": (int, "Input height and width (0: the backbone's default)."),
    "epochs": (int, "Total epochs, across phases."),
    "batch_size": (int, "Batch size per replica (global batch: this x replicas)."),
    "learning_rate": (float, "Learning rate of the head phase."),
    "max_examples": (int, "Cap on training examples (0: all)."),
    "examples_per_class": (int, "Cap on training examples per class (0: all)."),
    "seed": (int, "Random seed."),
    "workdir": (str, "Run folder (default runs/<regime>_<backbone>_<time>)."),
    "strict": (bool, "Fail on an undecodable image instead of skipping it."),
    "pool_grid": (int, "Head input: 1 global average, g a g x g grid of averages."),
    "cache_features": (bool, "Frozen backbone: train the head on features computed once."),
    "cached_views": (int, "Augmented views cached per training image."),
    "mixed_precision": (str, "mixed_float16 | mixed_bfloat16"),
    "jit_compile": (bool, "Compile with XLA."),
    "distribution": (str, "auto | none | mirrored | multi_worker (TF_CONFIG) | tpu"),
}
_DEFAULT_CONFIG = False  # --config was not given: configs/<regime>.py
_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           bool: flags.DEFINE_bool}


def fail(message):
    """Prints `PROGRAM: error: MESSAGE` on stderr and exits with status 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


class _Stopped(KeyboardInterrupt):
    """SIGTERM (a scheduler, `timeout`) turned into what Ctrl-C raises."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise _Stopped(signum)


_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_waiter = []  # the thread that takes them, once per process


def _signals_to_main_thread():
    """SIGINT and SIGTERM taken by one waiting thread and handed to the main thread's
    Python handler (`_thread.interrupt_main`), never delivered into a thread or a system
    call of TensorFlow's: a Ctrl-C that landed while TensorFlow ran a training step
    aborted the process ("corrupted double-linked list", SIGABRT) in about one try in
    five. The threads made meanwhile (TensorFlow's) and child processes inherit the
    blocked mask (experiments/benchmark.py unblocks it in its children). Returns the
    function that unblocks them again in the main thread."""
    import _thread
    import threading

    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    if not _waiter:
        def wait():
            while True:
                _thread.interrupt_main(signal.sigwait(_SIGNALS))

        _waiter.append(threading.Thread(target=wait, name="signals", daemon=True))
        _waiter[0].start()
    return lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def run(main, flags_parser=None, resumable=False):
    """absl's `app.run(main)`, with Python's garbage collector kept off what is
    alive when `main` starts (the flags parsed, TensorFlow and Keras imported:
    every full collection would scan them again) and at exit (`gc.freeze`):
    Python's last collection took 1.0-1.5 s of each tool's run with TensorFlow
    imported, and takes 0.1 s frozen (docs/performance.md). Unfrozen again when
    `main` returns, for a caller that goes on (a test running the tool in its
    own process).

    SIGINT (Ctrl-C) and SIGTERM stop the tool with one line and exit status
    128 + the signal's number, no traceback; `resumable`: the line says that the
    same command resumes (every file is written whole, run_folder.py)."""

    def frozen(argv):
        gc.freeze()
        previous = signal.signal(signal.SIGTERM, _stop)
        unblock = _signals_to_main_thread()
        try:
            try:
                return main(argv)
            except Exception as e:  # noqa: BLE001
                # Ctrl-C inside a TensorFlow context manager: its exit may raise its own
                # error ("Exiting variable_creator_scope without proper nesting") over
                # the KeyboardInterrupt, which stays in the chain.
                interrupt = _interrupt_behind(e)
                if interrupt is None:
                    raise
                raise interrupt from None
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            resume = "; nothing is half-written, and the same command resumes the run"
            print(f"{os.path.basename(sys.argv[0])}: stopped by {signal.Signals(signum).name}"
                  f"{resume if resumable else ''}", file=sys.stderr)
            sys.exit(128 + signum)
        finally:
            unblock()
            signal.signal(signal.SIGTERM, previous)
            gc.unfreeze()

    atexit.unregister(gc.freeze)  # once, however often a process runs a tool
    atexit.register(gc.freeze)  # atexit runs before the interpreter's last collections
    app.run(frozen, **({"flags_parser": flags_parser} if flags_parser else {}))


def _interrupt_behind(error):
    """The KeyboardInterrupt (Ctrl-C, or SIGTERM as `_Stopped`) that `error` was raised
    while handling, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def require_backend():
    """Fails at once, in one line, when Keras' backend is not installed (a plain
    `pip install -e .` brings no TensorFlow); call it before anything imports Keras."""
    missing = tl_keras.missing_backend()
    if missing:
        fail(missing)


def first_line(text):
    text = str(text).strip()
    return text.splitlines()[0] if text else "(no details)"


def define_config_flags(workdir_help=None):
    from ml_collections import config_flags

    try:  # ml_collections reads the command line's --flagfile files here already
        config_flags.DEFINE_config_file("config", None,
                                        "A config file, e.g. configs/large_similar.py.")
    except flags.Error as e:
        fail(first_line(str(e).replace("ERROR:: ", "")))
    for name, (kind, help_) in CONFIG_FLAGS.items():
        _DEFINE[kind](name, None, workdir_help if name == "workdir" and workdir_help else help_)


def parse_config_flags(argv):
    """absl parsing with the regime's config file as the default --config; bad flags exit 2."""
    from tl_keras import prepare

    global _DEFAULT_CONFIG
    argv = list(argv)
    path = _flag_value(argv, "config")
    _DEFAULT_CONFIG = path is None
    if path is None:
        try:  # the regime's own file (prepare.py: which file auto starts from)
            name = prepare.config_file_regime(_flag_value(argv, "regime") or "small_similar")
        except ValueError as e:
            fail(first_line(e))
        path = os.path.join(CONFIGS, name + ".py")
        argv.insert(1, f"--config={path}")
    path = path.split(":", 1)[0]  # FILE[:ARG]
    if not os.path.isfile(path):
        fail(f"config file {path!r} does not exist (--config=FILE[:ARG], e.g. "
             f"--config={os.path.join(CONFIGS, 'small_similar.py')})")
    try:
        argv = FLAGS(argv)
        config = FLAGS.config  # the file is loaded here: its errors surface now
    except flags.Error as e:
        fail(first_line(e))
    except AttributeError as e:
        if "get_config" in str(e):
            fail(f"config file {path!r} has no get_config() (see configs/base.py)")
        # ml_collections: --config.KEY for a KEY the config lacks
        fail(f"unknown config key {str(e).strip(chr(34))} (every key is in configs/base.py)")
    except (KeyError, TypeError, ValueError) as e:
        fail(f"bad --config value: {first_line(e)}")
    except OSError as e:  # ml_collections could not load the file
        fail(f"cannot load config file {path!r}: {first_line(e)}")
    except Exception as e:  # noqa: BLE001  the file itself: a syntax error, an import, a raise
        fail(f"cannot load config file {path!r}: {type(e).__name__}: {first_line(e)}")
    if not isinstance(config, ml_collections.ConfigDict):
        fail(f"get_config() of {path!r} returned {type(config).__name__}, "
             "not an ml_collections.ConfigDict")
    return argv


def _flag_value(argv, name):
    """The last value of `--NAME=VALUE` or `--NAME VALUE` in `argv`, or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def flags_config(folder, prefix=None):
    """FLAGS.config with the plain flags applied; with no workdir set, a new
    `folder/<prefix or regime>_<backbone>_<time>`. Resolve it once with `plan.resolve`."""
    from tl_keras import api, plan

    # A config file may set only some keys: the others take configs/base.py's defaults.
    config = plan.with_defaults(FLAGS.config)
    for name in CONFIG_FLAGS:
        value = getattr(FLAGS, name)
        if value is not None:
            config[name] = value
    return api.with_workdir(config, folder, prefix)


def given_keys():
    """Config keys the command line sets: plain flags and `--config.KEY=VALUE`."""
    from ml_collections import config_flags

    plain = {name for name in CONFIG_FLAGS if FLAGS[name].present}
    return plain | {key.split(".")[0] for key in config_flags.get_override_values(FLAGS["config"])}


def given_keys_or_none():
    """`given_keys()` when --config was not given (the regime's own file was read),
    else None: what `prepare.prepare` takes."""
    return given_keys() if _DEFAULT_CONFIG else None


def finetune_command(argv, dropped, decided):
    """The tools/finetune.py command that trains what a tool measured: the tool's own
    flags in `argv` (dataset, weights, image size, subsets, config file and keys) but
    those named in `dropped`, with `decided` ({flag: value}) first."""
    kept, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if name in dropped or name in decided:
            skip = "=" not in arg  # --flag VALUE: its value goes too
            continue
        kept.append(arg)
    return " ".join(["python", "tools/finetune.py",
                     *(f"--{k}={shlex.quote(str(v))}" for k, v in decided.items()),
                     *map(shlex.quote, kept)])
