"""tf.distribute: strategies by name, mirrored on 2 logical CPUs, two workers on 127.0.0.1.

TensorFlow fixes its devices and its cluster when a process starts, so the
mirrored and multi-worker cases run in processes of their own
(tests/distributed_run.py, or tools/finetune.py itself).
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT

HELPER = os.path.join(ROOT, "tests", "distributed_run.py")
FINETUNE = os.path.join(ROOT, "tools", "finetune.py")


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def history(run):
    with open(os.path.join(run, "history.csv")) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def metrics(run):
    with open(os.path.join(run, "metrics.json")) as f:
        return json.load(f)


def env(**extra):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


# --- Strategies by name -------------------------------------------------------------

def test_strategy_names_and_chief(monkeypatch):
    from tl_keras import distribute

    with pytest.raises(ValueError, match="unknown distribution 'gpus'; valid: auto, none, "
                                         "mirrored, multi_worker, tpu"):
        distribute.get_strategy("gpus")
    assert distribute.get_strategy("none") is None
    assert distribute.auto() == "none"  # no GPU, no TPU here
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="multi_worker needs TF_CONFIG"):
        distribute.get_strategy("multi_worker")
    assert distribute.is_chief()  # no cluster: the one process writes
    cluster = {"worker": ["a:1", "b:1"]}
    for task, chief in (({"type": "worker", "index": 0}, True),
                        ({"type": "worker", "index": 1}, False)):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
        assert distribute.is_chief() is chief
        assert distribute.workers() == 2
    with_chief = {**cluster, "chief": ["c:1"]}
    for task, chief in (({"type": "chief", "index": 0}, True),
                        ({"type": "worker", "index": 0}, False)):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": with_chief, "task": task}))
        assert distribute.is_chief() is chief
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute.is_chief()


@pytest.mark.parametrize("flags, extra_env, message", [
    (["--distribution=gpus"], {}, "unknown distribution 'gpus'; valid: auto, none, mirrored"),
    (["--distribution=multi_worker"], {"TF_CONFIG": ""}, "multi_worker needs TF_CONFIG"),
    (["--distribution=tpu"], {}, "--distribution=tpu: no TPU found"),
    (["--distribution=multi_worker"], {"TF_CONFIG": json.dumps({
        "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
        "task": {"type": "worker", "index": 2}})},
     "TF_CONFIG's task {'type': 'worker', 'index': 2} names no address of its cluster "
     "(2 of type 'worker')"),
    (["--distribution=multi_worker"], {"TF_CONFIG": "PORT_IN_USE"},
     "this worker's port PORT (TF_CONFIG: 127.0.0.1:PORT) is in use: Address already in use"),
])
def test_finetune_bad_distribution_is_one_line(tmp_path, run_tool, monkeypatch, flags,
                                               extra_env, message):
    taken = socket.create_server(("127.0.0.1", 0))  # a port another program listens on
    port = taken.getsockname()[1]
    for name, value in extra_env.items():
        if value == "PORT_IN_USE":
            value = tf_config([port, free_ports(1)[0]], 0)
        monkeypatch.setenv(name, value)
    message = message.replace("PORT", str(port))
    workdir = tmp_path / "run"
    result = run_tool("finetune.py", "--config=configs/smoke.py", "--dataset=digits",
                      f"--workdir={workdir}", *flags, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not workdir.exists()  # checked before anything is written
    taken.close()


def test_tune_refuses_multi_worker(tmp_path, run_tool):
    result = run_tool("tune.py", "--config=configs/smoke.py", "--dataset=digits",
                      "--distribution=multi_worker", f"--workdir={tmp_path / 'sweep'}", cwd=ROOT)
    assert result.returncode == 2
    assert "spreads its trials over hosts with KERASTUNER_*" in result.last_line()
    assert not (tmp_path / "sweep").exists()


# --- Full batches under a strategy ---------------------------------------------------

def test_drop_remainder_gives_full_batches_and_features_of_them(tmp_path, shared_images):
    from conftest import tiny_config
    from tl_keras import data, features, train

    config = tiny_config(tmp_path, dataset=str(shared_images))
    datasets = data.load(config, image_size=32, batch_size=4, drop_remainder=True)
    assert datasets.train_examples == 17 and datasets.drop_remainder
    assert [len(y) for _, y in datasets.train] == [4, 4, 4, 4]  # 17: the 17th is dropped
    assert sum(len(y) for _, y in datasets.val) == datasets.val_examples  # all of them
    model, _ = train.build(config, 3, 3)
    cache = features.compute(model, datasets, batch_size=4, verbose=0)
    assert len(cache.train[0]) == 16 and len(cache.val) == datasets.val_examples
    batches = cache.train_batches(4, seed=0, drop_remainder=True)
    assert len(batches) == 4 and all(len(batches[i][1]) == 4 for i in range(4))
    with pytest.raises(ValueError, match="17 training images are fewer than one batch of 32"):
        data.load(config, image_size=32, batch_size=32, drop_remainder=True)


# --- mirrored ------------------------------------------------------------------------

@pytest.mark.slow
def test_mirrored_two_replicas_match_one_device(tmp_path, shared_images):
    """2 logical CPUs x 4 images reach the same losses as 1 device x 8, epoch by epoch,
    through both phases of large_similar (cached head, then everything)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, HELPER, "mirrored", str(shared_images), str(out)],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = metrics(out / "none"), metrics(out / "mirrored")
    assert one["distribution"] == {"strategy": "none", "replicas": 1, "workers": 1,
                                   "batch_size_per_replica": 8, "global_batch_size": 8}
    assert two["distribution"] == {"strategy": "mirrored", "replicas": 2, "workers": 1,
                                   "batch_size_per_replica": 4, "global_batch_size": 8}
    assert two["train_path"] == {"head": "cached_features", "finetune": "fit"}
    # 3 validation images split 2/1 over the replicas: Keras' own first-batch
    # build fails on that (distribute.fix_symbolic_build).
    assert two["val_examples"] % 2 == 1
    a, b = history(out / "none"), history(out / "mirrored")
    assert len(a) == len(b) == 4
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        # Tolerance: float sums in another order; measured equal to 7 digits.
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-5,
                                   err_msg=key)
    assert a[-1]["loss"] < a[0]["loss"]  # it trained
    np.testing.assert_allclose(two["val_loss"], one["val_loss"], rtol=1e-5)


# --- multi_worker ------------------------------------------------------------------

def start_worker(command, ports, index, log, **extra_env):
    return subprocess.Popen(command, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env(TF_CONFIG=tf_config(ports, index), **extra_env))


def stop_all(processes):
    """A failed check leaves no worker behind, waiting for its peer."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_two_workers_train_to_identical_weights(tmp_path, shared_images):
    out = tmp_path / "out"
    ports = ",".join(map(str, free_ports(2)))
    procs = [subprocess.Popen([sys.executable, HELPER, "worker", str(i), ports,
                               str(shared_images), str(out)],
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]

    import h5py

    def weights(path):
        arrays = {}
        with h5py.File(path) as f:
            f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                         if isinstance(obj, h5py.Dataset) else None)
        return arrays

    w0, w1 = weights(out / "worker0.weights.h5"), weights(out / "worker1.weights.h5")
    assert len(w0) > 100 and w0.keys() == w1.keys()
    assert all(np.array_equal(w0[k], w1[k]) for k in w0)
    run = out / "run"
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]  # the chief alone wrote history.csv
    assert rows[-1]["loss"] < rows[0]["loss"]
    m = metrics(run)
    assert m["distribution"] == {"strategy": "multi_worker", "replicas": 2, "workers": 2,
                                 "batch_size_per_replica": 4, "global_batch_size": 8}
    assert m["train_path"] == {"head": "fit", "finetune": "fit"}
    assert m["epochs_run"] == 4 and m["phases"] == ["head", "finetune"]


@pytest.mark.slow
def test_killed_worker_restarted_resumes_from_last_checkpoint(tmp_path):
    """Worker 1 is killed mid-epoch; worker 0 restarts itself and waits; worker 1 is
    restarted with the same command; the run finishes, no finished epoch redone."""
    run = tmp_path / "run"
    ports = free_ports(2)
    epochs = 4
    command = [sys.executable, FINETUNE, "--config=configs/smoke.py:large_similar",
               "--dataset=digits", "--distribution=multi_worker", "--max_examples=256",
               "--batch_size=8", f"--epochs={epochs}", "--config.head_epochs=1",
               "--config.verbose=2", f"--workdir={run}"]

    processes = [start_worker(command, ports, i, tmp_path / f"w{i}.log") for i in range(2)]
    chief, other = processes
    try:
        deadline = time.time() + 300
        while (not (run / "history.csv").exists() or len(history(run)) < 2) \
                and time.time() < deadline and chief.poll() is None:
            time.sleep(0.2)
        done_before = len(history(run))
        assert done_before == 2, (tmp_path / "w0.log").read_text()[-3000:]
        time.sleep(1.0)  # into epoch 3 (an epoch takes several seconds)
        other.send_signal(signal.SIGKILL)
        other.wait()
        time.sleep(3)
        restarted = start_worker(command, ports, 1, tmp_path / "w1b.log")
        processes.append(restarted)
        assert restarted.wait(timeout=400) == 0, (tmp_path / "w1b.log").read_text()[-3000:]
        assert chief.wait(timeout=100) == 0, (tmp_path / "w0.log").read_text()[-3000:]
    finally:
        stop_all(processes)

    log = (tmp_path / "w0.log").read_text()
    assert "A worker of the cluster failed" in log and "Restarting this worker (1/10)" in log
    resumed = log[log.index("Restarting this worker"):]
    assert "Resuming the unfinished run" in resumed
    # The restarted chief ran epochs from the last checkpoint on, and none before.
    ran = [int(line.split()[1].split("/")[0]) for line in resumed.splitlines()
           if line.startswith("Epoch ")]
    assert ran and ran[0] >= done_before + 1 and ran == list(range(ran[0], epochs + 1))
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))  # each epoch once
    m = metrics(run)
    assert m["epochs_run"] == epochs and m["distribution"]["workers"] == 2
    assert "Done; the chief wrote the run folder" in (tmp_path / "w1b.log").read_text()
    assert not (run / "backup").exists()


@pytest.mark.slow
def test_tuner_trials_run_under_mirrored(tmp_path, shared_images):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, HELPER, "tune", str(shared_images), str(out)],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sorted((out / "sweep" / "trials").iterdir())
    assert len(trials) == 2
    for trial in trials:
        m = metrics(trial)
        assert m["distribution"] == {"strategy": "mirrored", "replicas": 2, "workers": 1,
                                     "batch_size_per_replica": 4, "global_batch_size": 8}
        assert m["epochs_run"] == 4
    with open(out / "sweep" / "tuning.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["COMPLETED"] * 2


@pytest.mark.slow
def test_two_workers_validate_a_last_batch_that_leaves_a_replica_empty(tmp_path):
    """The probe's case: 9 validation images over a global batch of 8 leave one
    worker nothing in the last batch. Both finish, and the chief's val_accuracy
    and val_loss are the final model's on all 9 images."""
    from conftest import write_image_folder

    images = tmp_path / "images"
    write_image_folder(images, per_class=16, size=32)
    for extra in images.glob("*/x.*"):  # 3 x 16 images: 39 train, 9 validation
        extra.unlink()
    run, ports = tmp_path / "run", free_ports(2)
    command = [sys.executable, FINETUNE, "--config=configs/smoke.py:large_similar",
               f"--dataset={images}", "--distribution=multi_worker", "--weights=none",
               "--image_size=32", "--batch_size=4", "--epochs=2", "--config.head_epochs=1",
               "--config.verbose=2", f"--workdir={run}"]
    processes = [start_worker(command, ports, i, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        codes = [p.wait(timeout=400) for p in processes]
    finally:
        stop_all(processes)
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "Data: 39 training and 9 validation images" in logs[0]

    import keras
    from tl_keras import data, plan as plan_lib

    plan = plan_lib.resolve(plan_lib.with_defaults(json.loads((run / "config.json").read_text())))
    val = data.load(plan.config, image_size=32, batch_size=9).val
    model = keras.saving.load_model(run / "model.keras")
    loss, accuracy = model.evaluate(val, verbose=0)[:2]
    m = metrics(run)
    assert m["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert m["val_loss"] == pytest.approx(loss, rel=1e-4)


@pytest.mark.slow
def test_sigterm_stops_a_worker_and_its_peer_gives_up_waiting_for_it(tmp_path):
    """SIGTERM to worker 1 mid-run stops it in one line (TensorFlow's coordination
    agent swallowed it); the chief restarts itself, waits --config.peer_timeout for
    worker 1, then stops with one line (it waited forever, deaf to SIGTERM)."""
    run, ports = tmp_path / "run", free_ports(2)
    command = [sys.executable, FINETUNE, "--config=configs/smoke.py:large_similar",
               "--dataset=digits", "--distribution=multi_worker", "--max_examples=256",
               "--batch_size=8", "--epochs=4", "--config.head_epochs=1",
               "--config.verbose=2", "--config.peer_timeout=10", f"--workdir={run}"]
    processes = [start_worker(command, ports, i, tmp_path / f"w{i}.log") for i in range(2)]
    chief, other = processes
    try:
        deadline = time.time() + 300
        while not (run / "history.csv").exists() and time.time() < deadline \
                and chief.poll() is None:
            time.sleep(0.2)
        other.send_signal(signal.SIGTERM)
        assert other.wait(timeout=30) == 128 + signal.SIGTERM
        stopped = time.time()
        code = chief.wait(timeout=200)
    finally:
        stop_all(processes)
    assert (tmp_path / "w1.log").read_text().strip().splitlines()[-1] == (
        "finetune.py: stopped by SIGTERM; nothing is half-written, and the same command "
        "resumes the run")
    log = (tmp_path / "w0.log").read_text()
    assert "Restarting this worker (1/10)" in log, log[-3000:]
    assert code == 2 and time.time() - stopped < 120, log[-3000:]
    assert log.strip().splitlines()[-1] == (
        f"finetune.py: error: --distribution=multi_worker: 127.0.0.1:{ports[1]} of TF_CONFIG "
        "did not join within 10 s (--config.peer_timeout); start every worker, or raise it")


@pytest.mark.slow
def test_worker_waiting_for_its_peers_stops_on_sigterm(tmp_path):
    command = [sys.executable, FINETUNE, "--config=configs/smoke.py:large_similar",
               "--dataset=digits", "--distribution=multi_worker", f"--workdir={tmp_path / 'run'}"]
    log = tmp_path / "w0.log"
    worker = start_worker(command, free_ports(2), 0, log)  # worker 1 never starts
    try:
        deadline = time.time() + 120
        while "Waiting up to 300 s for the 2 workers" not in log.read_text() \
                and time.time() < deadline and worker.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)
        assert worker.poll() is None, log.read_text()[-2000:]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 128 + signal.SIGTERM
    finally:
        stop_all([worker])
    assert log.read_text().strip().splitlines()[-1].startswith("finetune.py: stopped by SIGTERM")
    assert not (tmp_path / "run").exists()
