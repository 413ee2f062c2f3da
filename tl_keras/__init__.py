"""tl_keras: transfer learning for Keras in four regimes.

Modules, in the order data flows:
    plan        a config resolved once: regime, backbone, cut, image size, phases, loss
    arrays      built-in datasets and the seeded split as numpy arrays (no TensorFlow)
    data        tf.data pipelines from folders, TFDS, built-in datasets, arrays
    backbones   Keras Applications backbones (and efficientnet_lite, read from
                torch_state_dict files), their preprocessing, named cut points
    model       raw pixels -> preprocessing -> cut backbone -> new Dense head
    features    cached backbone features for training a head on a frozen backbone
    folded      forward passes as one constant-folded TensorFlow graph (CPU)
    trainable   the regimes as data; the one function that applies them
    losses      the training loss (label smoothing)
    train       phases with model.fit (distribute: tf.distribute); writes the run folder
    run_folder  what a run folder holds; starting, resuming and refusing one
    tune        Keras Tuner sweeps whose trials train as `train` does
    export      a finished model as a SavedModel for TF Serving
    benchmark   tools/benchmark.py's measurements
    keras_internals  every private Keras / Keras Tuner API used, version-checked
    tf_internals     the same for TensorFlow's (folded's constant conversion)

configs/ installs as `tl_keras.configs` (setup.cfg).
"""

import importlib.util
import json
import os

__version__ = "0.1.0"


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
