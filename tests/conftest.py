"""Shared fixtures: tiny configs, tiny image folders, tiny pretend-pretrained weights."""

import atexit
import contextlib
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Manifests of checked image folders (image_files.CheckedFiles) go here, not into ~/.cache:
# one folder per pytest call (its processes inherit it), removed when the call ends.
if "TL_KERAS_CACHE" not in os.environ:
    os.environ["TL_KERAS_CACHE"] = tempfile.mkdtemp(prefix="tl_keras_cache_")
    atexit.register(shutil.rmtree, os.environ["TL_KERAS_CACHE"], ignore_errors=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tl_keras.configs import smoke  # noqa: E402

TINY_BACKBONE = "mobilenet_v3_small_minimalistic"
TINY_SIZE = 32


def tiny_config(tmp_path, regime="small_similar", **overrides):
    """The smoke config, writing into `tmp_path`, quiet."""
    config = smoke.get_config(regime)
    config.workdir = str(tmp_path / "run")
    config.verbose = "0"
    config.augment = False
    config.epochs = 2
    config.head_epochs = 1
    for key, value in overrides.items():
        config[key] = value
    return config


def write_image_folder(root, classes=("cat", "dog", "fox"), per_class=6, size=40, seed=0):
    """A folder dataset of small random images, formats mixed (PNG, JPEG, BMP, GIF)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    encoders = [("png", tf.io.encode_png), ("jpg", tf.io.encode_jpeg)]
    paths = []
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            # Classes differ in brightness, so a head can learn them.
            image = rng.integers(0, 90, (size, size, 3)) + 80 * c
            image = np.clip(image, 0, 255).astype("uint8")
            ext, encode = encoders[i % 2]
            path = root / name / f"{i}.{ext}"
            path.write_bytes(encode(image).numpy())
            paths.append(path)
    from PIL import Image
    Image.fromarray(np.full((size, size, 3), 100, "uint8")).save(root / classes[0] / "x.bmp")
    Image.fromarray(np.full((size, size), 7, "uint8"), mode="L").save(root / classes[1] / "x.gif")
    return paths


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root)
    return root


def tiny_arrays(n=24, num_classes=3, size=TINY_SIZE, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    x = rng.integers(0, 100, (n, size, size, channels)) + 70 * y[:, None, None, None]
    return np.clip(x, 0, 255).astype("uint8"), y.astype("int32")


def imagenet_labels():
    """The 1,000 ImageNet synset ids in model output order (shipped with TFDS)."""
    import tensorflow_datasets as tfds

    path = os.path.join(os.path.dirname(tfds.__file__), "datasets/imagenet2012/labels.txt")
    with open(path) as f:
        return f.read().split()


# ImageNet's domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian cat.
IMAGENET_CATS = {"n02123045", "n02123159", "n02123394", "n02123597", "n02124075"}
ESPRESSO = "n07920052"


def resized_photos(size):
    """skimage's coffee() and chelsea() photos at `size` px, float32 [2, size, size, 3]."""
    import tensorflow as tf
    skimage_data = pytest.importorskip("skimage.data")

    return np.concatenate([tf.image.resize(i[None].astype("float32"), (size, size),
                                           antialias=True)
                           for i in (skimage_data.coffee(), skimage_data.chelsea())])


def assert_espresso_and_cat(model, preprocess_input):
    """`model` (an ImageNet classifier at 224 px) ranks espresso first for coffee() and a
    domestic cat first for chelsea(), the coffee at over 0.5; returns its probabilities."""
    labels = imagenet_labels()
    probs = model.predict(preprocess_input(resized_photos(224)), verbose=0)
    top1 = [labels[i] for i in probs.argmax(-1)]
    assert top1[0] == ESPRESSO, top1
    assert top1[1] in IMAGENET_CATS, top1
    assert probs[0].max() > 0.5
    return probs


# --- TensorFlow functions: eager in the fast suite ---------------------------------------
# Tracing a tiny model's train, test and predict functions costs more than the few steps
# most tests run (docs/testing.md): the fast suite runs TensorFlow's functions eagerly.
# Tests marked `graph` (many steps: tracing once is cheaper) or `slow`, every tool run in
# a new process, and users' runs trace them. What a test asserts holds either way:
# TL_KERAS_TEST_TRACED=1 traces them in every test, as before.
TRACE_ALL = os.environ.get("TL_KERAS_TEST_TRACED") == "1"


def eager_functions(on):
    import tensorflow as tf

    tf.config.run_functions_eagerly(on and not TRACE_ALL)


@contextlib.contextmanager
def traced():
    """TensorFlow's functions traced meanwhile, as in a user's run (a shared fixture's
    many steps)."""
    eager_functions(False)
    try:
        yield
    finally:
        eager_functions(True)


@pytest.fixture(autouse=True)
def _functions_eager_unless_graph(request):
    traced_here = any(request.node.get_closest_marker(m) for m in ("graph", "slow"))
    eager_functions(not traced_here)
    yield
    eager_functions(True)


@pytest.fixture(scope="session", autouse=True)
def _functions_eager_in_shared_fixtures():
    """Shared fixtures too, unless they train inside `traced()`. (A fixture, not an
    import-time call: pytest-xdist's controller, which runs no test, imports this file
    and needs no TensorFlow.)"""
    eager_functions(True)


# --- tf.data without its autotuning thread ----------------------------------------------
# A tf.data iterator with autotuning on runs a model thread that sleeps between tuning
# rounds, each twice as long as the last, up to 60 s. Deleting the iterator cancels the
# thread and waits for it, but TensorFlow runs the cancel callback that wakes it before it
# marks the cancellation done (tsl's CancellationManager::StartCancelWithStatus), and
# Model::OptimizeLoop, woken too early, sees nothing cancelled and sleeps out the rest of
# its round. Two processes on two cores hit that race often: a test waited, cores idle, for
# up to a minute while an iterator Keras or a pipeline had left was collected
# (docs/testing.md, "Stalls"). The fast suite's iterators run without autotuning: the same
# elements in the same order, parallel maps on every core, prefetch buffers tuned the
# older way (no thread), as tl_keras' own pipelines run for users too
# (data.without_tuning_thread); this hook covers the pipelines Keras builds itself (arrays,
# PyDatasets). TL_KERAS_TEST_AUTOTUNE=1 leaves those autotuned, as users get them.
KEEP_AUTOTUNE = os.environ.get("TL_KERAS_TEST_AUTOTUNE") == "1"


@pytest.fixture(scope="session", autouse=True)
def _iterators_without_autotuning():
    from tensorflow.python.data.ops import dataset_ops

    from tl_keras.data import without_tuning_thread

    dataset = dataset_ops.DatasetV2
    # Every iterator (Python's, Keras', tf.distribute's) comes from a dataset passed
    # through this hook; it is private, so a TensorFlow without it keeps autotuning.
    if KEEP_AUTOTUNE or not hasattr(dataset, "_apply_debug_options"):
        yield
        return
    original = dataset._apply_debug_options
    dataset._apply_debug_options = lambda self: without_tuning_thread(original(self))
    yield
    dataset._apply_debug_options = original


# --- The two processes finish together -------------------------------------------------
# pytest-xdist hands each process one test file at a time, in collection order
# (setup.cfg: --no-loadscope-reorder; its default orders by number of tests), and a
# process takes its next file before it has finished the last. The files that train
# most (5-45 s each on 2 cores) go first, so that the last ones are short and
# neither process waits long for the other at the end (docs/testing.md).
LONGEST_FIRST = ("test_advise.py", "test_train.py", "test_litert.py", "test_hub_backbones.py",
                 "test_export.py", "test_report.py", "test_tasks.py", "test_api.py",
                 "test_tune.py", "test_efficientnet_lite.py", "test_features.py",
                 "test_backbones.py", "test_data.py", "test_mobilenet_v2.py",
                 "test_finetune_cli.py", "test_trainable.py", "test_model.py", "test_recipe.py",
                 "test_lr_find.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """An empty Keras cache for the test: converted weights are written there."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    return tmp_path / "keras_home"


@pytest.fixture(scope="session")
def shared_images(tmp_path_factory):
    """The `image_folder` images, written once for the session: read, never change them."""
    root = tmp_path_factory.mktemp("shared") / "images"
    write_image_folder(root)
    return root


# --- Tools in this process ----------------------------------------------------------

class ToolResult:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def last_line(self):
        return self.stderr.strip().splitlines()[-1]


def run_as_main(path, args):
    """Runs the tool at `path` in this process, as `python PATH ARGS...` runs it: its
    file as `__main__` with its flags, which are removed afterwards, so the next tool
    (which may define the same names) starts clean. Returns the exit code."""
    import runpy
    import sys

    from absl import app, flags  # noqa: F401  absl.app defines its flags (run_with_pdb, ...)
    # on import: imported here, before `before`, they are not removed after the first tool.

    argv, sys.argv = sys.argv, [path, *map(str, args)]
    before = set(flags.FLAGS)
    try:
        runpy.run_path(path, run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        for flag in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, flag)
        # ml_collections loads --config as module "config_config" and would
        # execute the next config file into the same module, keeping its names.
        sys.modules.pop("config_config", None)


def tool_in_process(name, *args, cwd):
    """`tools/NAME ARGS...` run in this process from `cwd`, for a shared fixture (where
    capsys and monkeypatch are not available): a `ToolResult`."""
    import contextlib
    import io

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_as_main(os.path.join(TOOLS, name), args)
    finally:
        os.chdir(here)
    return ToolResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def run_tool(capsys, monkeypatch):
    """Runs `tools/NAME ARGS...` in this process, as `python tools/NAME ARGS...` runs it
    (`run_as_main`): no new Python and TensorFlow per call. Returns a `ToolResult` with
    the exit code, stdout and stderr.
    """
    def run(name, *args, cwd=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = run_as_main(os.path.join(TOOLS, name), args)
        out, err = capsys.readouterr()
        return ToolResult(code, out, err)

    return run
