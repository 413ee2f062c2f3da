"""Scaling out on tf.distribute: a strategy per `--distribution`, and a training loop for many hosts.

    none          one device (the default device: a GPU when there is one)
    mirrored      every GPU of this machine (`MirroredStrategy`); without a
                  GPU, every logical CPU device
    multi_worker  several machines, one process each, described by TF_CONFIG
                  (`MultiWorkerMirroredStrategy`)
    tpu           a TPU VM or Cloud TPU (`TPUStrategy`)
    auto          tpu when one is attached, mirrored with 2+ GPUs, else none

`config.batch_size` is per replica; the pipelines are batched at the global
batch, per-replica x replicas. Models are built, compiled and re-compiled
for each phase inside `strategy.scope()` (train.py).

Keras 3's `fit` fails under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585, tensorflow/tensorflow#72388): it reduces a data
batch and each step's metrics with cross-host reductions that do not take
those values. `fit` below runs instead: the same `model.train_step` and
`model.test_step` through `strategy.run` over `experimental_distribute_dataset`,
with the same Keras callbacks. Only the chief writes the run folder; every
worker reads the chief's checkpoints, so the workdir must be on storage all
workers see (NFS, GCS).

Example:
    strategy = get_strategy("mirrored")            # before any other TensorFlow work
    data = tl_keras.data.load(config, image_size, batch_size=global_batch(config, strategy),
                              drop_remainder=replicas(strategy) > 1)
    train.finetune(config, data, strategy=strategy)
"""

import contextlib
import glob
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

import keras
import tensorflow as tf

from tl_keras import keras_internals, plan, tf_internals

NAMES = plan.DISTRIBUTIONS


def get_strategy(name, peer_timeout=300):
    """The `tf.distribute.Strategy` for `name` (see NAMES), or None for one device.

    Call it before any other TensorFlow work: a multi-worker strategy
    configures the collective ops, which must happen at program start, and
    waits up to `peer_timeout` seconds for every worker of TF_CONFIG to start.
    Raises `ValueError` with one line saying what is missing.
    """
    if name not in NAMES:
        raise ValueError(f"unknown distribution {name!r}; valid: {', '.join(NAMES)}")
    if name == "auto":
        name = auto()
    if name == "none":
        return None
    # Strategies log every collective at INFO level (per step under absl).
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        cluster = tf_config().get("cluster", {})
        if not cluster.get("worker") and not cluster.get("chief"):
            raise ValueError(
                "--distribution=multi_worker needs TF_CONFIG with the cluster and this "
                'worker\'s task, e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}} (docs/scaling_out.md)')
        return _multi_worker_strategy(peer_timeout)
    return _tpu_strategy()


def _multi_worker_strategy(peer_timeout):
    """`MultiWorkerMirroredStrategy()`, once every worker has started, waiting at
    most `peer_timeout` seconds for them.

    The strategy's own wait for the cluster is one call into C++ that holds
    Python's lock: no signal handler runs (Python runs them between bytecodes),
    TensorFlow's coordination agent takes SIGTERM for a preemption notice, and
    without a peer it waited forever; a worker restarted after a peer died
    hung until kill -9. So the wait happens here first, in Python, where
    Ctrl-C and SIGTERM stop it: each worker listens on its TF_CONFIG port
    until it can reach every other's (a peer still waiting here, or already
    serving the cluster there). The strategy's registration then gets the
    time left, at least 10 s, as its own bound (a peer that dies in between).
    """
    me = _own_address()
    peers = [address for address in _addresses() if address != me]
    print(f"Waiting up to {peer_timeout:g} s for the {len(peers) + 1} workers of TF_CONFIG "
          "(--config.peer_timeout)", flush=True)
    deadline = time.monotonic() + peer_timeout
    with _listening(me):
        while peers:
            peers = [address for address in peers if not _reachable(address)]
            if peers and time.monotonic() > deadline:
                raise ValueError(_not_joined(peer_timeout, peers))
            if peers:
                time.sleep(0.5)
    tf_internals.configure_coordination(max(10.0, deadline - time.monotonic()))
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except tf.errors.DeadlineExceededError as e:
        raise ValueError(_not_joined(peer_timeout, ["one of them"])) from e
    if threading.current_thread() is threading.main_thread():
        # The coordination agent put its SIGTERM handler (a preemption notice,
        # which nothing here reads) over Python's: Python's back, so that
        # SIGTERM stops training as it does on one device.
        signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))
    return strategy


def _not_joined(peer_timeout, peers):
    return (f"--distribution=multi_worker: {', '.join(peers)} of TF_CONFIG did not join "
            f"within {peer_timeout:g} s (--config.peer_timeout); start every worker, or "
            "raise it")


def _addresses():
    """Every chief's and worker's address in TF_CONFIG."""
    cluster = tf_config().get("cluster", {})
    return cluster.get("chief", []) + cluster.get("worker", [])


def _own_address():
    cluster = tf_config()
    task = cluster.get("task", {})
    kind, index = task.get("type", "worker"), task.get("index", 0)
    addresses = cluster["cluster"].get(kind, [])
    if not isinstance(index, int) or not 0 <= index < len(addresses):
        raise ValueError(f"TF_CONFIG's task {task} names no address of its cluster "
                         f"({len(addresses)} of type {kind!r})")
    return addresses[index]


@contextlib.contextmanager
def _listening(address):
    """A plain TCP listener on `address`'s port, closed before the strategy's
    server takes the port: what the other workers' `_reachable` finds."""
    port = int(address.rsplit(":", 1)[1])
    try:
        listener = socket.create_server(("", port))
    except OSError as e:
        raise ValueError(f"--distribution=multi_worker: this worker's port {port} "
                         f"(TF_CONFIG: {address}) is in use: {e.strerror}") from e
    with listener:
        yield


def _reachable(address):
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
        return True
    except OSError:
        return False


def auto():
    """What `--distribution=auto` picks here: tpu, mirrored or none."""
    if _tpu_attached():
        return "tpu"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "none"


def _tpu_attached():
    # A TPU VM's chips are /dev/accel*; a Cloud TPU node or Colab names its
    # TPU in the environment. (Newer TPU VMs may show only /dev/vfio, which
    # other machines have too: there, pass --distribution=tpu.)
    return bool(os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR")
                or glob.glob("/dev/accel*"))


def _tpu_strategy():
    tpu = os.environ.get("TPU_NAME", "local")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        if tpu != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (tf.errors.OpError, ValueError, RuntimeError) as e:
        reason = (getattr(e, "message", None) or str(e)).strip().splitlines()[0]
        raise ValueError(
            f"--distribution=tpu: no TPU found ({reason[:160]}); run on a TPU VM, or set "
            "TPU_NAME to a Cloud TPU (docs/scaling_out.md)") from e
    return tf.distribute.TPUStrategy(resolver)


def name_of(strategy):
    """"none", "mirrored", "multi_worker" or "tpu" for `strategy` (None: "none")."""
    if strategy is None:
        return "none"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multi_worker"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    return "mirrored"


def replicas(strategy):
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)


def global_batch(config, strategy):
    """`config.batch_size` (per replica) times the replicas: what each step reads."""
    return int(config.batch_size) * replicas(strategy)


def uses_loop(strategy):
    """Whether training goes through `fit` below instead of Keras' own `fit`."""
    return name_of(strategy) == "multi_worker"


def tf_config():
    try:
        return json.loads(os.environ.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from e


def writes(strategy):
    """Whether this process writes the run folder: always, except on a
    multi-worker run's workers other than the chief."""
    return not uses_loop(strategy) or is_chief()


def is_chief():
    """Whether this process writes the run folder: the chief, else worker 0, else alone."""
    cluster = tf_config()  # TF_CONFIG, not a tl_keras config
    task = cluster.get("task", {})
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return (task.get("type") == "worker" and int(task.get("index", 0)) == 0
            and not cluster.get("cluster", {}).get("chief"))


def workers():
    """The processes TF_CONFIG lists (chief and workers)."""
    return max(1, len(_addresses()))


def fix_symbolic_build(model):
    """Lets `model.fit`/`evaluate` under a strategy take any first batch, and leaves
    the data's order alone.

    Before its first step, Keras' TensorFlow trainer builds the model from a
    first batch it reads off a fresh iterator, averaged over the replicas
    (`strategy.reduce("MEAN")`), only to learn its shapes. When that batch
    splits unevenly (3 validation images on 2 replicas) the average fails:
    "Inputs to operation AddN ... must have the same size and shape"
    (tensorflow/tensorflow#33715); and the extra iterator moves a reshuffling
    pipeline on by one order, so training sees other batches than on one
    device. The pipeline's `element_spec` gives the shapes without reading.
    """
    return keras_internals.build_from_spec(model)


# --- Fault tolerance -----------------------------------------------------------------

MAX_RESTARTS = 10  # per process, counted in the environment across restarts


def is_peer_failure(error):
    """Whether `error` is a multi-worker collective that failed because another worker died."""
    return isinstance(error, tf.errors.UnavailableError) or (
        isinstance(error, tf.errors.OpError) and "Collective ops is aborted" in str(error))


def restart(error):
    """Replaces this process with a fresh run of the same command (`os.execv`).

    A collective op that failed cannot be reset in the process (TensorFlow:
    "Restart your program to reset"). The fresh process waits at the strategy's
    start until every worker is up again, then every worker resumes from the
    chief's last BackupAndRestore checkpoint. Raises `RuntimeError` after
    MAX_RESTARTS.
    """
    count = int(os.environ.get("TL_KERAS_RESTARTS", "0"))
    reason = (getattr(error, "message", None) or str(error)).strip().splitlines()[0]
    if count >= MAX_RESTARTS:
        raise RuntimeError(f"a worker of the cluster failed {count + 1} times; giving up "
                           f"(last error: {reason[:200]})")
    os.environ["TL_KERAS_RESTARTS"] = str(count + 1)
    print(f"A worker of the cluster failed ({reason[:200]}). Restarting this worker "
          f"({count + 1}/{MAX_RESTARTS}); it resumes from the last checkpoint once every "
          "worker runs again.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable] + sys.argv)


# --- Multi-worker training loop ----------------------------------------------------

def _distributed(strategy, dataset):
    # Every worker reads the whole pipeline in the same seeded order and keeps
    # its share of each global batch: the sources (files, arrays) are not split
    # into one file per worker, so sharding by file would not be even.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def _step_function(model, strategy, step):
    @tf.function(reduce_retracing=True)  # a last, smaller validation batch
    def run(batch):
        logs = strategy.run(step, args=(batch,))
        # For the progress bar and the divergence guard: the replicas' running means
        # over full batches (epoch logs: `_results`).
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in logs.items()}
    return run


def _test_step(model):
    """`model.test_step` for one replica's share of a batch, which may be empty.

    The last validation batch is not dropped (every image is validated), and
    split over the replicas it can leave some with nothing: 9 images over a
    global batch of 8 gives a last batch of 1, and a replica of 0, which the
    model cannot take ("Incompatible shapes: [0,48,48,3] vs. [32]"). An empty
    share updates no metric. A test step has no collective op, so replicas
    may skip it; a training step has (the gradients' all-reduce), and its
    batches are all full (`data.load(drop_remainder=True)`).
    """
    def step(batch):
        images = tf.nest.flatten(batch)[0]
        return tf.cond(tf.shape(images)[0] > 0, lambda: model.test_step(batch),
                       model.get_metrics_result)
    return step


def _build(model, strategy, dataset):
    """Creates the optimizer's and the compiled metrics' variables before any step:
    variables cannot be created inside `strategy.run`."""
    with strategy.scope():  # what fit's _maybe_symbolic_build does, from the shapes alone
        keras_internals.symbolic_build(model, dataset.element_spec)
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)


def fit(model, strategy, train_data, validation_data, initial_epoch, epochs, callbacks,
        verbose):
    """`model.fit(train_data, validation_data=..., ...)` for a multi-worker strategy.

    `train_data` and `validation_data` are tf.data pipelines batched at the
    global batch. Runs the callbacks as fit does (BackupAndRestore's restored
    epoch included) and returns the `History`.
    """
    _build(model, strategy, train_data)
    train_step = _step_function(model, strategy, model.train_step)
    test_step = _step_function(model, strategy, _test_step(model))
    dist_train, dist_val = _distributed(strategy, train_data), _distributed(strategy,
                                                                           validation_data)
    steps = int(train_data.cardinality())
    callbacks = keras.callbacks.CallbackList(
        callbacks, add_history=True, add_progbar=verbose != 0, verbose=verbose,
        epochs=epochs, steps=steps if steps > 0 else None, model=model)
    model.stop_training = False
    keras_internals.initial_epoch(model)  # cleared, so that a stale one is not read
    callbacks.on_train_begin()
    initial_epoch = keras_internals.initial_epoch(model) or initial_epoch  # BackupAndRestore
    epoch_logs = {}
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        logs = {}
        for step, batch in enumerate(dist_train):
            callbacks.on_train_batch_begin(step)
            logs = _numpy(train_step(batch))
            callbacks.on_train_batch_end(step, logs)
            if model.stop_training:
                break
        epoch_logs = _results(model, strategy)
        epoch_logs.update({f"val_{k}": v for k, v in
                           _evaluate(model, strategy, test_step, dist_val).items()})
        callbacks.on_epoch_end(epoch, epoch_logs)
        if model.stop_training:
            break
    callbacks.on_train_end(logs=epoch_logs)
    return model.history


def evaluate(model, strategy, data):
    """The logs of `model` on the pipeline `data` ({"loss": ..., each metric: ...}), like
    `model.evaluate(data, return_dict=True)`."""
    _build(model, strategy, data)
    return _evaluate(model, strategy, _step_function(model, strategy, _test_step(model)),
                     _distributed(strategy, data))


def _evaluate(model, strategy, test_step, dist_data):
    model.reset_metrics()
    for batch in dist_data:
        test_step(batch)
    return _results(model, strategy)


def _results(model, strategy):
    """The metrics over every example every worker saw since the last reset.

    Keras' metric variables are sync-on-read: read outside `strategy.run`
    they are summed over the replicas (totals and counts alike), as
    `fit` reports them. The replicas' own means, averaged, would be wrong
    when a last batch splits unevenly.
    """
    with strategy.scope():
        return _numpy(model.get_metrics_result())


def _numpy(logs):
    return {k: float(v) for k, v in logs.items()}
