"""tl_keras: transfer learning for Keras in four regimes.

One call from Python or a notebook (api.py; docs/python.md):

    import tl_keras
    run = tl_keras.finetune("fashion_mnist", regime="small_similar", max_examples=2000)
    tl_keras.advise_regime("digits"), tl_keras.evaluate_run(run.workdir)
    tl_keras.classify(run.workdir, ["photo.jpg"])

Modules, in the order data flows:
    plan        a config resolved once: regime, backbone, cut, image size, phases, task
    tasks       what a run predicts: the head's activation, loss, metric, labels, decoding
    arrays      built-in datasets and the seeded split as numpy arrays (no TensorFlow)
    data        tf.data pipelines from folders, TFDS, built-in datasets, arrays
                (tables: labels from a CSV or DataFrame; image_files: every file
                checked once; augment: flips to CutMix)
    backbones   Keras Applications backbones (and efficientnet_lite, read from
                torch_state_dict files), their preprocessing, named cut points
    model       raw pixels -> preprocessing -> cut backbone -> new Dense head
    features    cached backbone features for training a head on a frozen backbone
    folded      forward passes as one constant-folded TensorFlow graph (CPU)
    trainable   the regimes as data; the one function that applies them
    recipe      how a phase trains: optimizer, schedule, layer-wise rates, EMA, early stopping
    losses      the training loss (label smoothing)
    train       phases with model.fit (distribute: tf.distribute); writes the run folder
                (callbacks: the divergence guard, best.keras)
    run_folder  what a run folder holds; starting, resuming and refusing one
    tune        Keras Tuner sweeps whose trials train as `train` does
    report      a finished run's curves.png, regime.png, report.html
    evaluate, predict  a finished run measured, and used on new images
    export, litert     a finished model as a SavedModel for TF Serving, or for LiteRT
    advise      the regime advisor's measurement and decision (transferability: LogME,
                H-score, k-NN); pilots: its short real runs (above train)
    prepare     the one path every run starts from: plan, strategy, data, advice
    lr_find     the learning-rate range test (tools/lr_find.py)
    api         the calls above, one each; tools/*.py are thin callers of them
    keras_internals  every private Keras / Keras Tuner API used, version-checked
    tf_internals     the same for TensorFlow's (folded's constant conversion)

configs/ installs as `tl_keras.configs` (setup.cfg); experiments/ beside tools/ holds
the drivers of tools/study.py and tools/benchmark.py (not installed).

`import tl_keras` imports neither Keras nor TensorFlow: the calls load on first use,
so `missing_backend` can say in one line that TensorFlow is missing.
"""

import importlib.util
import json
import os

__version__ = "0.1.0"

__all__ = ["finetune", "advise_regime", "evaluate_run", "classify", "find_learning_rate",
           "make_config", "Run", "AdviceRun", "Evaluation", "Predictions", "RangeTestRun",
           "missing_backend",
           "interactive", "__version__"]
_API = {"finetune", "advise_regime", "evaluate_run", "classify", "find_learning_rate",
        "make_config", "Run", "AdviceRun", "Evaluation", "Predictions", "RangeTestRun"}


def __getattr__(name):  # PEP 562: tl_keras.finetune imports api.py (and Keras) on first use
    if name in _API:
        from tl_keras import api

        return getattr(api, name)
    if name == "interactive":
        from tl_keras import plan

        return plan.interactive
    raise AttributeError(f"module 'tl_keras' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _API | {"interactive"})


def missing_backend():
    """A one-line message when Keras' backend is not installed, else None.

    A plain `pip install tl_keras` brings no TensorFlow (the `[cpu]` and `[gpu]`
    extras each bring one build), and Keras then fails deep inside its import.
    The backend is found as Keras finds it: `KERAS_BACKEND`, else the
    `backend` of `$KERAS_HOME/keras.json` (default ~/.keras), else tensorflow.
    """
    backend = os.environ.get("KERAS_BACKEND")
    if not backend:
        path = os.path.join(os.environ.get("KERAS_HOME") or os.path.expanduser("~/.keras"),
                            "keras.json")
        try:
            with open(path) as f:
                backend = json.load(f).get("backend")
        except (OSError, ValueError, AttributeError):
            backend = None
    backend = backend or "tensorflow"
    try:
        found = importlib.util.find_spec(backend) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    if backend == "tensorflow":
        return ("TensorFlow is not installed, and Keras runs on it here: install tl_keras "
                "with one of its extras, pip install -e '.[cpu]' (no GPU: the small "
                "tensorflow-cpu) or -e '.[gpu]' (NVIDIA GPUs)")
    return (f"Keras' backend {backend!r} (KERAS_BACKEND or keras.json) is not installed: "
            f"pip install {backend}, or unset KERAS_BACKEND to use TensorFlow")
