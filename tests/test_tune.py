"""Keras Tuner sweeps: the regime's search space, trials trained as finetune trains them,
features shared per cut, results, resume, chief and workers, bad input."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import keras_tuner as kt
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from tl_keras import data, plan as plan_lib, train, tune

TOOL = os.path.join(ROOT, "tools", "tune.py")
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def space(config):
    hp = kt.HyperParameters()
    names = tune.search_space(hp, plan_lib.resolve(config))
    return names, {p.name: p for p in hp.space}


def test_search_space_per_regime(tmp_path):
    frozen = ["cut", "dropout", "learning_rate", "label_smoothing"]
    names, hps = space(tiny_config(tmp_path, "small_similar"))
    assert names == frozen
    assert list(hps["cut"].values) == ["early", "middle", "late", "top"]
    assert hps["cut"].default == "top"  # each default is the regime's own value
    assert hps["dropout"].default == 0.2 and hps["learning_rate"].default == 1e-3

    names, hps = space(tiny_config(tmp_path, "small_different"))
    assert names == frozen
    assert list(hps["cut"].values) == ["early", "middle", "late"]  # below the top
    assert hps["cut"].default == "early"

    names, hps = space(tiny_config(tmp_path, "large_similar", epochs=5, head_epochs=2))
    assert names == frozen + ["head_epochs", "finetune_learning_rate", "unfreeze"]
    assert (hps["head_epochs"].min_value, hps["head_epochs"].max_value) == (1, 4)
    assert hps["head_epochs"].default == 2
    assert list(hps["unfreeze"].values) == [1, 2, 3, 0]

    # Training from scratch has no head phase and unfreezes nothing.
    names, _ = space(tiny_config(tmp_path, "large_different", init="scratch"))
    assert names == frozen


def test_trial_config_takes_the_values_and_hyperbands_epochs(tmp_path):
    config = tiny_config(tmp_path, "large_similar", epochs=6)
    trial = tune.trial_config(config, {"cut": "late", "unfreeze": 2, "tuner/epochs": 3,
                                       "tuner/initial_epoch": 1, "tuner/bracket": 0})
    assert (trial.cut, trial.unfreeze, trial.epochs) == ("late", 2, 3)
    assert "tuner/bracket" not in trial and config.epochs == 6  # the sweep's config is untouched


def hyperparameters(plan, **values):
    hp = kt.HyperParameters()
    tune.search_space(hp, plan)
    hp.values.update(values)
    return hp


def test_trials_train_as_finetune_does_and_share_features_per_cut(tmp_path, shared_images):
    plan = plan_lib.resolve(tiny_config(tmp_path, "small_similar", dataset=str(shared_images),
                                        val_fraction=0.4, epochs=3))
    config = plan.config
    # tf.data's seeded shuffle also depends on TensorFlow's global seed when the
    # pipeline is made: the same for both pipelines here, as in two fresh processes.
    keras.utils.set_random_seed(config.seed)
    datasets = data.load(config, image_size=plan.image_size)
    hypermodel = tune.TransferHyperModel(plan, datasets, str(tmp_path / "sweep"))

    def trial(trial_id, **values):
        hp = hyperparameters(plan, **values)
        keras.backend.clear_session()  # as Keras Tuner does before each build
        model = hypermodel.build(hp)
        result = hypermodel.fit(hp, model, trial_id=trial_id)
        with open(tmp_path / "sweep" / "trials" / trial_id / "metrics.json") as f:
            return model, result, json.load(f)

    a_model, a, a_metrics = trial("a", cut="middle", dropout=0.1, learning_rate=3e-3)
    b_model, b, b_metrics = trial("b", cut="middle", dropout=0.3, learning_rate=1e-2,
                                  label_smoothing=0.1)
    c_model, c, c_metrics = trial("c", cut="early")

    # A trial builds what its values say: the cut, the dropout.
    assert b_metrics["cut_layer"] == "expanded_conv_2_add"  # the smoke config's backbone's "middle"
    assert b_model.get_layer("dropout").rate == 0.3
    assert c_metrics["cut_layer"] == "expanded_conv_project_bn"
    # Features are computed once per cut: b reuses a's, c has its own.
    assert [m["cached_features"]["reused"] for m in (a_metrics, b_metrics, c_metrics)] == [
        False, True, False]
    assert len(hypermodel.feature_store) == 2
    # No model files in a trial's run folder.
    assert not os.path.exists(tmp_path / "sweep" / "trials" / "a" / "model.keras")
    assert a["val_accuracy"] == a_metrics["val_accuracy"]
    assert a["seconds"] == a_metrics["wall_seconds"] and a["peak_rss_mb"] >= a["rss_mb"] > 0

    # b, on reused features, equals finetune.py's run of the same config.
    reference_config = tune.trial_config(config, {"cut": "middle", "dropout": 0.3,
                                                  "learning_rate": 1e-2, "label_smoothing": 0.1})
    reference_config.workdir = str(tmp_path / "reference")
    keras.backend.clear_session()  # as a new finetune.py process starts
    # New pipelines, as in a new process: the cache of trial a was the first
    # (seeded) shuffle of the training set; a pipeline read again is reshuffled.
    keras.utils.set_random_seed(config.seed)
    reference = train.finetune(reference_config, data.load(config, image_size=plan.image_size))
    assert reference["cached_features"]["reused"] is False
    assert b["val_accuracy"] == reference["val_accuracy"]
    reference_model = keras.models.load_model(tmp_path / "reference" / "model.keras")
    np.testing.assert_array_equal(b_model.get_layer("predictions").kernel.numpy(),
                                  reference_model.get_layer("predictions").kernel.numpy())


def run_tool(*args, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, TOOL, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def sweep_args(shared_images, workdir, *extra):
    return (f"--config={SMOKE}", f"--dataset={shared_images}", "--config.val_fraction=0.4",
            "--config.augment=false", "--config.verbose=0", "--epochs=3",
            f"--workdir={workdir}", *extra)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sweep_writes_results_best_first_and_the_winner_retrains(tmp_path, shared_images):
    sweep = tmp_path / "sweep"
    result = run_tool(*sweep_args(shared_images, sweep, "--max_trials=3"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(sweep / "tuning.csv")
    assert [r["status"] for r in rows] == ["COMPLETED"] * 3
    scores = [float(r["val_accuracy"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert list(rows[0])[:5] == ["trial_id", "status", "val_accuracy", "seconds", "peak_rss_mb"]
    for row in rows:  # every row is its trial's run
        metrics = json.load(open(sweep / "trials" / row["trial_id"] / "metrics.json"))
        assert float(row["val_accuracy"]) == metrics["val_accuracy"]
        assert metrics["cut_layer"] == {
            "early": "expanded_conv_project_bn", "middle": "expanded_conv_2_add",
            "late": "expanded_conv_7_add", "top": "re_lu_22"}[row["cut"]]
        assert float(row["dropout"]) == pytest.approx(
            json.load(open(sweep / "trials" / row["trial_id"] / "config.json"))["dropout"])
    # The table on stdout, best first.
    table = result.stdout[result.stdout.index("trial_id  status"):].splitlines()
    assert [line.split()[0] for line in table[1:4]] == [r["trial_id"] for r in rows]

    # One command retrains the winner: the same val_accuracy, and a model to export.
    best = sweep / "best_config.py"
    assert f"trial_id {rows[0]['trial_id']}" in best.read_text()
    retrain = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "finetune.py"), f"--config={best}",
         "--workdir=winner"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    winner = json.load(open(tmp_path / "winner" / "metrics.json"))
    assert winner["val_accuracy"] == float(rows[0]["val_accuracy"])
    assert os.path.exists(tmp_path / "winner" / "model.keras")

    # Re-run with more trials: the finished ones are not redone.
    stamps = {r["trial_id"]: os.stat(sweep / "trials" / r["trial_id"] / "metrics.json").st_mtime
              for r in rows}
    again = run_tool(*sweep_args(shared_images, sweep, "--max_trials=4"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 trial(s) finished in an earlier attempt" in again.stdout
    rows = read_csv(sweep / "tuning.csv")
    assert len(rows) == 4 and len(os.listdir(sweep / "trials")) == 4
    for trial_id, stamp in stamps.items():
        assert os.stat(sweep / "trials" / trial_id / "metrics.json").st_mtime == stamp

    # Other settings in the same sweep folder: refused, nothing touched.
    before = (sweep / "tuning.csv").read_text()
    other = run_tool(*sweep_args(shared_images, sweep, "--max_trials=5", "--regime=small_different"),
                     cwd=tmp_path)
    assert other.returncode == 2
    assert last_line(other) == (
        f"tune.py: error: workdir '{sweep}' holds a sweep with other settings (differs in: "
        "cut, regime); re-run it with the same settings to resume, "
        "or choose another --workdir")
    assert (sweep / "tuning.csv").read_text() == before


@pytest.mark.slow
def test_killed_sweep_resumes_with_the_interrupted_trial(tmp_path, shared_images):
    sweep = tmp_path / "sweep"
    args = [sys.executable, TOOL, *sweep_args(shared_images, sweep, "--max_trials=3")]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    started = sweep / "trials" / "1" / "config.json"  # the second trial has begun
    deadline = time.time() + 300
    while not started.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert started.exists()
    first = os.stat(sweep / "trials" / "0" / "metrics.json").st_mtime

    result = run_tool(*sweep_args(shared_images, sweep, "--max_trials=3"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(sweep / "tuning.csv")
    assert sorted(r["trial_id"] for r in rows) == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" for r in rows)
    assert os.stat(sweep / "trials" / "0" / "metrics.json").st_mtime == first
    assert sorted(os.listdir(sweep / "trials")) == ["0", "1", "2"]


@pytest.mark.slow
def test_hyperband_continues_its_best_trials(tmp_path, shared_images):
    sweep = tmp_path / "sweep"
    # Its first bracket: three trials of one epoch, then the best one continued to three.
    result = run_tool(*sweep_args(shared_images, sweep, "--tuner=hyperband", "--max_trials=4",
                                  "--regime=large_similar"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    oracle = json.load(open(sweep / "tuner" / "oracle.json"))
    assert oracle  # Keras Tuner's state is in the sweep folder
    continued = []
    for trial_id in os.listdir(sweep / "tuner"):
        if not trial_id.startswith("trial_"):
            continue
        trial = json.load(open(sweep / "tuner" / trial_id / "trial.json"))
        values = trial["hyperparameters"]["values"]
        assert trial["status"] == "COMPLETED", trial.get("message")
        if values.get("tuner/trial_id"):
            continued.append((trial_id[len("trial_"):], values))
    assert continued, "Hyperband continued no trial"
    for trial_id, values in continued:
        # A continued trial starts where its parent stopped, from the parent's weights.
        with open(sweep / "trials" / trial_id / "history.csv") as f:
            epochs = [int(line.split(",")[0]) for line in f if line[0].isdigit()]
        assert epochs == list(range(values["tuner/initial_epoch"], values["tuner/epochs"]))
        assert os.path.exists(sweep / "tuner" / f"trial_{values['tuner/trial_id']}"
                              / "checkpoint.weights.h5")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_chief_and_two_workers_run_every_trial_once(tmp_path, shared_images):
    port = free_port()
    args = [sys.executable, TOOL, *sweep_args(shared_images, tmp_path / "sweep", "--max_trials=4")]

    def start(tuner_id):
        env = dict(os.environ, KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP="127.0.0.1",
                   KERASTUNER_ORACLE_PORT=str(port))
        return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    chief = start("chief")
    workers = [start("tuner0"), start("tuner1")]
    outputs = [p.communicate(timeout=600) for p in [chief, *workers]]
    for p, (out, err) in zip([chief, *workers], outputs):
        assert p.returncode == 0, err[-3000:]
    ran = [line.split()[1] for out, _ in outputs[1:] for line in out.splitlines()
           if line.startswith("trial_id ") and " done on tuner" in line]
    assert sorted(ran) == ["0", "1", "2", "3"]  # each trial exactly once, across the workers
    assert all(" done on tuner" not in line for line in outputs[0][0].splitlines())
    rows = read_csv(tmp_path / "sweep" / "tuning.csv")  # written by the chief
    assert sorted(r["trial_id"] for r in rows) == ["0", "1", "2", "3"]
    assert f"trial_id {rows[0]['trial_id']}" in (tmp_path / "sweep" / "best_config.py").read_text()
    assert "trial_id  status" in outputs[0][0]


def last_line(result):
    return result.stderr.strip().splitlines()[-1]


def test_bad_input_is_one_line_and_exit_2(tmp_path, shared_images, run_tool, monkeypatch):
    base = sweep_args(shared_images, tmp_path / "sweep")
    result = run_tool("tune.py", *base, "--tuner=grid", cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line() == ("tune.py: error: unknown tuner 'grid'; "
                                  "valid tuners: random, hyperband, bayesian")
    result = run_tool("tune.py", "--regime=medium_similar", cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line().startswith("tune.py: error: unknown regime 'medium_similar'")
    result = run_tool("tune.py", *base, "--max_trials=0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line() == "tune.py: error: max_trials must be at least 1, got 0"
    assert not os.path.exists(tmp_path / "sweep")  # nothing written for bad flags

    # A worker whose oracle does not answer gives up after --oracle_wait.
    port = str(free_port())
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner0")
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", port)
    began = time.time()
    result = run_tool("tune.py", *base, "--oracle_wait=0.5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line() == (
        f"tune.py: error: no Keras Tuner oracle answers at 127.0.0.1:{port} after 0.5 s; start "
        "the chief first (KERASTUNER_TUNER_ID=chief) or fix KERASTUNER_ORACLE_IP/PORT")
    assert time.time() - began < 60
    monkeypatch.delenv("KERASTUNER_ORACLE_PORT")
    result = run_tool("tune.py", *base, cwd=tmp_path)
    assert result.last_line() == ("tune.py: error: KERASTUNER_ORACLE_IP is set but "
                                  "KERASTUNER_ORACLE_PORT not; distributed tuning needs all three")


def test_a_failed_trial_is_reported_with_its_error(tmp_path, shared_images, monkeypatch):
    plan = plan_lib.resolve(tiny_config(tmp_path, "small_similar", dataset=str(shared_images),
                                        val_fraction=0.4))
    datasets = data.load(plan.config, image_size=plan.image_size)

    def diverges(*args, **kwargs):
        raise FloatingPointError("loss became NaN in phase 'head'; try a lower learning rate")

    monkeypatch.setattr(train, "finetune", diverges)
    tuner = tune.make_tuner("random", plan, datasets, 2, str(tmp_path / "sweep"))
    tuner.search(verbose=0)  # a failed trial does not stop the sweep
    rows = tune.write_results(tuner, plan, str(tmp_path / "sweep"))
    assert [r["status"] for r in rows] == ["FAILED", "FAILED"]
    assert rows[0]["error"] == ("FloatingPointError: loss became NaN in phase 'head'; "
                                "try a lower learning rate")
    assert "trial_id 0 FAILED: FloatingPointError: loss became NaN" in tune.format_table(rows)
    assert not os.path.exists(tmp_path / "sweep" / "best_config.py")  # no winner


@pytest.mark.slow  # ~15 s: a sweep of 3 trials on a multi-label table, in this process
def test_a_multi_label_sweep_ranks_its_trials_by_val_map(tmp_path, run_tool):
    from test_tasks import write_multi_label_table

    table, _ = write_multi_label_table(tmp_path / "images")
    sweep = tmp_path / "sweep"
    result = run_tool("tune.py", f"--config={SMOKE}", f"--dataset={table}",
                      "--config.task=multi_label", "--config.augment=false",
                      "--config.verbose=0", "--epochs=3", "--max_trials=3",
                      f"--workdir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(sweep / "tuning.csv")
    assert list(rows[0])[:3] == ["trial_id", "status", "val_mAP"]
    scores = [float(r["val_mAP"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    for row in rows:  # every row is its trial's multi-label run
        metrics = json.load(open(sweep / "trials" / row["trial_id"] / "metrics.json"))
        assert (metrics["task"], metrics["val_mAP"]) == ("multi_label", float(row["val_mAP"]))
        assert "val_accuracy" not in metrics
    assert f"trial_id {rows[0]['trial_id']}" in (sweep / "best_config.py").read_text()
