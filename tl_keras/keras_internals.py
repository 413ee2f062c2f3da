"""Every private Keras and Keras Tuner API tl_keras relies on, in one place.

Each works around something the public API cannot do (the reasons are where
they are used). Private APIs change without notice, so each is checked against
the versions tl_keras was tested with: on another version, using one fails with
a one-line `RuntimeError` that names the version to install, instead of a
wrong result or an AttributeError deep inside a run. (Private TensorFlow APIs
are in tf_internals.py, which shares `check_version`: this module imports no
TensorFlow.)

    symbolic_build(model, spec)      Model._symbolic_build: variables from shapes
    build_before_tracing(m, data)    Model._symbolic_build before one device traces a step
    build_from_spec(model)           replaces Model._maybe_symbolic_build (distribute.py)
    initial_epoch(model)             Model._initial_epoch, set by BackupAndRestore
    ReadOnlyBackup                   BackupAndRestore without BackupAndRestore._save_model
    fresh_layer_names()              keras.src...global_state: automatic names from 0
    seeded_rand_augment(**kwargs)    RandAugment._get_seed_generator: draws from a batch's seed
    save_best_epoch_class()          keras_tuner.src...tuner_utils.SaveBestEpoch
    leaf_layers(layer)               Layer._flatten_layers: the layers inside a Layer too
    producer(tensor)                 KerasTensor._keras_history: the operation that made it
    cache_saving_skipsets()          saving_lib.get_attr_skipset: its cache read where written

Example:
    keras_internals.symbolic_build(model, dataset.element_spec)
"""

import collections
import contextlib
import types

import keras

TESTED = {"keras": "3.15", "keras_tuner": "1.4", "tensorflow": "2.21"}  # major.minor


def is_tested(package, version):
    """Whether `version` is the major.minor in `TESTED[package]`."""
    return version.split(".")[:2] == TESTED[package].split(".")


def check_version(package, version, what):
    """Raises `RuntimeError` unless `version` is the major.minor in `TESTED[package]`."""
    tested = TESTED[package]
    if not is_tested(package, version):
        raise RuntimeError(
            f"tl_keras uses a private {package} API ({what}) tested with {package} "
            f"{tested}.x, and {package} {version} is installed; install "
            f"'{package}>={tested},<{_next_minor(tested)}' (as setup.cfg pins it)")


def _next_minor(version):
    major, minor = version.split(".")
    return f"{major}.{int(minor) + 1}"


def _keras(what):
    check_version("keras", keras.__version__, what)


# --- Layers ---------------------------------------------------------------------

def leaf_layers(layer):
    """Every layer inside `layer` that holds no other layer, at any depth. A
    KerasHub transformer keeps its blocks as attributes of one Layer (no
    `.layers`), so `Model.layers` stops at that Layer; this does not."""
    _keras("Layer._flatten_layers")
    return [sub for sub in layer._flatten_layers(include_self=False, recursive=True)
            if not any(True for _ in sub._flatten_layers(include_self=False, recursive=False))]


def producer(tensor):
    """The layer or operation whose output the symbolic `tensor` is (a KerasHub model's
    published stage, named by the layer that makes it)."""
    _keras("KerasTensor._keras_history")
    return tensor._keras_history.operation


# --- keras.Model ------------------------------------------------------------------

def symbolic_build(model, spec):
    """Creates `model`'s compiled metrics' variables from the shapes of `spec` (a batch
    or a `tf.TensorSpec` structure), as `fit` does before its first step."""
    _keras("Model._symbolic_build")
    model._symbolic_build(data_batch=spec)


def build_before_tracing(model, data):
    """Creates `model`'s optimizer, loss and metric variables from the shapes of
    `data` (what `fit`, `evaluate` or `train_on_batch` reads: a tf.data pipeline, a
    `keras.utils.PyDataset`, or a batch such as an `(x, y)` tuple of arrays)
    before Keras traces its step.

    With no distribution strategy, Keras' TensorFlow trainer leaves this to the
    first trace of the step, and a trace that creates variables is traced again
    (tf.function's rule for variables made on a first call): every phase's
    train step was traced twice. A tiny MobileNetV3's first `fit` (graph mode,
    2 CPU cores): 21-23 s, built first 10-11 s. Under a strategy Keras builds
    from a first batch itself (`build_from_spec`), and other backends build
    before they trace: nothing is done there. Nor where the step runs eagerly
    (`run_eagerly`, `tf.config.run_functions_eagerly`): nothing is traced, and
    the symbolic pass over the model (~0.4 s for a tiny MobileNetV3) is saved.
    """
    if keras.backend.backend() != "tensorflow":
        return
    _keras("Trainer._distribute_strategy, module_utils.tensorflow")
    from keras.src.utils.module_utils import tensorflow as tf  # Keras' lazy TensorFlow

    if (model._distribute_strategy is not None or model.run_eagerly
            or tf.config.functions_run_eagerly()):
        return
    spec = getattr(data, "element_spec", None)
    if spec is None:
        batch = data[0] if isinstance(data, keras.utils.PyDataset) else data
        spec = keras.tree.map_structure(
            lambda a: None if a is None else keras.KerasTensor(
                (None,) + tuple(a.shape[1:]), keras.backend.standardize_dtype(a.dtype)),
            batch)
    symbolic_build(model, spec)


def build_from_spec(model):
    """Makes `model.fit`/`evaluate` build from the pipeline's `element_spec` instead of
    reading (and averaging over replicas) a first batch; see
    `distribute.fix_symbolic_build` for why."""
    _keras("Model._maybe_symbolic_build")

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            data_batch = iterator.data_adapter.get_tf_dataset().element_spec
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = types.MethodType(_maybe_symbolic_build, model)
    return model


def initial_epoch(model):
    """The epoch `BackupAndRestore.on_train_begin` restored `model` to, or None;
    clears it for the next `on_train_begin`."""
    _keras("Model._initial_epoch")
    epoch, model._initial_epoch = getattr(model, "_initial_epoch", None), None
    return epoch


class ReadOnlyBackup(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` that restores from `backup_dir` and writes and deletes
    nothing (a multi-worker run's workers other than the chief)."""

    def __init__(self, backup_dir):
        _keras("BackupAndRestore._save_model")
        super().__init__(backup_dir, delete_checkpoint=False)

    def _save_model(self):
        pass


# --- Layer names ------------------------------------------------------------------

@contextlib.contextmanager
def fresh_layer_names():
    """Builds with Keras' automatic layer names counted from zero.

    Keras numbers unnamed layers ("add", "add_1", ...) with a process-wide
    counter, so the same backbone gets other names once any model has been
    built before it. Counting afresh makes the cut table of backbones.py hold
    in every process; afterwards the counters continue past both, so no name
    is reused.
    """
    _keras("keras.src.backend.common.global_state")
    from keras.src.backend.common import global_state

    key = "object_name_uids"
    saved = global_state.get_global_attribute(key, default=None)
    fresh = collections.defaultdict(int)
    global_state.set_global_attribute(key, fresh)
    try:
        yield
    finally:
        merged = collections.defaultdict(int, saved or {})
        for prefix, count in fresh.items():
            merged[prefix] = max(merged[prefix], count)
        global_state.set_global_attribute(key, merged)


def seeded_rand_augment(**kwargs):
    """Keras' `RandAugment(**kwargs)` drawing every random number from a seed given
    with each batch: `layer.augment(images, seed)`, `seed` an int64 [2] tensor.

    RandAugment takes no seed per call: its ops and their strengths come from its
    own SeedGenerator, which the parallel calls of a tf.data `map` draw from in a
    varying order (runs with the same seed then differ). Here the generator it asks
    for (`RandAugment._get_seed_generator`) hands out `seed + [0, k]` for its k-th
    draw of the call instead: the same batch and seed give the same images in any
    thread, and a new seed (each batch, each epoch) new ones.
    """
    _keras("keras.layers.RandAugment._get_seed_generator")

    class BatchSeeds(keras.random.SeedGenerator):
        def __init__(self):
            super().__init__(seed=0)
            self.batch_seed, self.draws = None, 0

        def next(self, ordered=True):
            self.draws += 1
            return keras.ops.add(self.batch_seed, keras.ops.convert_to_tensor(
                [0, self.draws], dtype=self.batch_seed.dtype))

    class SeededRandAugment(keras.layers.RandAugment):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.batch_seeds = BatchSeeds()

        def _get_seed_generator(self, backend):
            return self.batch_seeds

        def augment(self, images, seed):
            self.batch_seeds.batch_seed, self.batch_seeds.draws = seed, 0
            return self(images, training=True)

    return SeededRandAugment(**kwargs)


# --- Saving -----------------------------------------------------------------------

def cache_saving_skipsets():
    """Makes Keras' saver reuse the attribute sets it skips, as it means to.

    Keras 3.15's `saving_lib.get_attr_skipset(obj_type)` looks its cache up
    under "saving_attr_skiplist_<type>" but stores it under
    "saving_attr_skipset_<type>", so every object a save or a load walks (each
    layer, the optimizer, their containers) builds a reference `Layer()` again
    to list its attributes: about half of saving a small model (a tiny
    MobileNetV3's .keras file 0.48 s -> 0.25 s, its weights 0.31 -> 0.20 s on
    2 CPU cores), paid at every epoch's backup and every best.keras. This looks
    under the key Keras stores: the same sets, computed by Keras and cleared
    with its global state (`clear_session`). On another Keras version it does
    nothing. Idempotent.
    """
    if not is_tested("keras", keras.__version__):
        return
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    uncached = saving_lib.get_attr_skipset
    if getattr(uncached, "reads_its_cache", False):
        return

    def get_attr_skipset(obj_type):
        skipset = global_state.get_global_attribute(f"saving_attr_skipset_{obj_type}")
        return uncached(obj_type) if skipset is None else skipset

    get_attr_skipset.reads_its_cache = True
    saving_lib.get_attr_skipset = get_attr_skipset


# --- Keras Tuner ------------------------------------------------------------------

def save_best_epoch_class():
    """Keras Tuner's `SaveBestEpoch` callback class (not exported), with which
    Hyperband saves the weights a continued trial starts from."""
    import keras_tuner

    check_version("keras_tuner", keras_tuner.__version__, "tuner_utils.SaveBestEpoch")
    from keras_tuner.src.engine.tuner_utils import SaveBestEpoch

    return SaveBestEpoch
