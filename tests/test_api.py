"""One call from Python (tl_keras/api.py): the same run as the tool, results that show
themselves, errors of one line, and the quickstart notebook in a real Jupyter kernel."""

import html
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_BACKBONE, write_image_folder

import tl_keras
from tl_keras import arrays, run_folder

SMALL = dict(backbone=TINY_BACKBONE, weights="none", image_size=32, epochs=2,
             head_epochs=1, batch_size=16, verbose="0", augment=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("api") / "images"
    write_image_folder(root, per_class=8)
    return root


@pytest.fixture(scope="module")
def python_run(images, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("api_run") / "run"
    return tl_keras.finetune(str(images), regime="large_similar", workdir=str(workdir), **SMALL)


def test_import_brings_no_keras_and_lists_the_public_calls():
    code = ("import sys, tl_keras; print('keras' in sys.modules, 'tensorflow' in sys.modules);"
            "print(tl_keras.__all__); print('finetune' in dir(tl_keras))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "False False"  # the calls import Keras on first use
    assert {"finetune", "advise_regime", "evaluate_run", "classify"} <= set(eval(out[1]))
    assert out[2] == "True"


@pytest.mark.slow
def test_finetune_from_python_is_the_tools_run(python_run, images, tmp_path, run_tool):
    flags = [f"--{k}={v}" for k, v in SMALL.items() if k not in ("epochs", "head_epochs",
                                                                   "verbose", "augment")]
    cli = run_tool("finetune.py", "--regime=large_similar", f"--dataset={images}", *flags,
                   "--epochs=2", "--config.head_epochs=1", "--config.verbose=0",
                   "--config.augment=false", f"--workdir={tmp_path / 'cli'}")
    assert cli.returncode == 0, cli.stderr
    ours, theirs = python_run.workdir, str(tmp_path / "cli")
    config = run_folder.read_json(os.path.join(ours, "config.json"))
    other = run_folder.read_json(os.path.join(theirs, "config.json"))
    assert run_folder.differing_keys(config, other) == ["workdir"]
    metrics = run_folder.read_json(os.path.join(theirs, "metrics.json"))
    assert python_run.metrics["val_accuracy"] == metrics["val_accuracy"]
    assert python_run.metrics["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert python_run.metrics["phases"] == ["head", "finetune"]
    assert f"val_accuracy: {metrics['val_accuracy']:.4f}" in cli.stdout
    for name in ("report.html", "curves.png", "regime.png", "model.keras"):
        assert os.path.exists(os.path.join(ours, name)), name


def test_the_result_shows_itself_and_loads_its_model(python_run):
    page = python_run._repr_html_()
    assert f"val_accuracy {python_run.val_accuracy:.4f}" in page
    embedded = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)">', page)
    assert embedded == ["Training curves", "What the regime trained"]
    assert repr(python_run).startswith(f"Run(workdir={python_run.workdir!r}")
    model = python_run.model
    assert model.count_params() == (python_run.metrics["trainable_params"]
                                    + python_run.metrics["non_trainable_params"])
    assert model.get_layer("predictions").units == 3


def test_evaluate_and_classify_from_python(python_run, images):
    evaluation = tl_keras.evaluate_run(python_run.workdir)
    saved = run_folder.read_json(os.path.join(python_run.workdir, "eval", "eval.json"))
    assert evaluation.result["accuracy"] == saved["accuracy"]
    assert "confusion.png" in evaluation._repr_html_()
    found = tl_keras.classify(python_run.workdir, [str(images)], top_k=2)
    decodable = sum(len(files) for _, _, files in os.walk(images))
    assert len(found.rows) + len(found.skipped) == decodable
    assert all(row[1] in ("cat", "dog", "fox") and len(row) == 5 for row in found.rows)
    assert html.escape(found.rows[0][0]) in found._repr_html_()


@pytest.mark.parametrize("overrides, message", [
    (dict(epoch=3), "unknown config key 'epoch' (every key is in configs/base.py)"),
    (dict(advisor={"samples": 5}), "unknown config key 'advisor.samples'; valid: "),
    (dict(advisor=5), "config key 'advisor' takes a dict of its keys"),
    (dict(epochs="many"), "bad value for epochs: "),
    (dict(regime="auto", cut="late"),
     "--regime=auto decides cut, init, pool_grid; drop cut or name a regime"),
    (dict(regime="medium"), "unknown regime 'medium'; valid regimes: small_similar, "),
    # A notebook user's slips (issue 38): each was trained on, or a deep error, before.
    (dict(batch_size=True), "bad value for batch_size: takes a whole number, got True"),
    (dict(augment=1), "bad value for augment: takes True or False, got 1"),
    (dict(export_format="onnx"), "unknown export_format 'onnx'; valid: saved_model, litert"),
    (dict(config={"epochs": 1, "epoch": 2}), "unknown config key 'epoch'"),
    (dict(config=5), "config takes an ml_collections.ConfigDict or a dict of config keys, "
                     "got int"),
])
def test_bad_settings_are_one_line_before_any_work(tmp_path, overrides, message):
    overrides.setdefault("regime", "small_similar")
    with pytest.raises(ValueError) as error:
        tl_keras.finetune("digits", workdir=str(tmp_path / "run"), **overrides)
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "run")


def test_paths_dicts_and_comma_lists_are_taken_as_the_tools_take_them(monkeypatch):
    import pathlib

    from tl_keras import api

    config, _ = api.make_config("small_similar", dataset=pathlib.Path("some/images"))
    assert config.dataset == "some/images"
    config, given = api.make_config("small_similar", config={"epochs": 3, "seed": 4})
    assert (config.epochs, config.seed, config.batch_size, given) == (3, 4, 32, None)
    seen = {}
    monkeypatch.setattr(api, "advise_config", lambda config, cuts: seen.setdefault("cuts", cuts))
    tl_keras.advise_regime("digits", cuts="early, late")
    assert seen["cuts"] == ["early", "late"]  # not e, a, r, l, y


def test_advise_regime_writes_an_advice_folder(images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = tl_keras.advise_regime(str(images), backbone=TINY_BACKBONE,
                                    weights="none", image_size=32)
    assert os.path.dirname(result.workdir) == "runs"
    assert os.path.basename(result.workdir).startswith(f"advice_{TINY_BACKBONE}_")
    saved = run_folder.read_json(os.path.join(result.workdir, "advice.json"))
    assert saved["regime"] == result.advice.regime == "large_different"  # random weights
    assert "LogME per cut" in result._repr_html_()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(arrays.FASHION_MNIST_DIR),
                    reason="the quickstart trains on Fashion-MNIST: "
                           "apt-get install dataset-fashion-mnist")
def test_quickstart_notebook_runs_in_a_jupyter_kernel(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(os.path.join(ROOT, "examples", "quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = [o for o in outputs if o.output_type == "execute_result"
             and o.data["text/plain"].startswith("Run(")]
    assert len(shown) == 1 and "data:image/png;base64," in shown[0].data["text/html"]
    (workdir,) = os.listdir(tmp_path / "runs")
    metrics = json.load(open(tmp_path / "runs" / workdir / "metrics.json"))
    assert metrics["train_examples"] == 2000 and metrics["val_examples"] == 10_000
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"val_accuracy {metrics['val_accuracy']:.4f}" in printed
    assert os.path.exists(tmp_path / "runs" / workdir / "eval" / "eval.json")


def test_a_peer_lost_before_training_is_a_peer_failure_to_restart_from(images, tmp_path,
                                                                       monkeypatch):
    # A multi-worker run whose peer dies while the data is read or the advisor's pilots
    # train must rejoin afresh (tools/finetune.py restarts on PeerFailure), as in training.
    import tensorflow as tf

    from tl_keras import api, distribute, prepare

    def peer_gone(plan, strategy):
        raise tf.errors.UnavailableError(None, None, "Collective ops is aborted by: peer gone")

    monkeypatch.setattr(prepare, "make_strategy", lambda plan: "multi_worker")
    monkeypatch.setattr(prepare, "load_data", peer_gone)
    monkeypatch.setattr(distribute, "uses_loop", lambda strategy: strategy == "multi_worker")
    monkeypatch.setattr(distribute, "writes", lambda strategy: True)
    with pytest.raises(api.PeerFailure, match="peer gone"):
        tl_keras.finetune(str(images), workdir=str(tmp_path / "run"), **SMALL)
