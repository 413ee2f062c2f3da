"""tools/finetune.py end to end, as a user runs it."""

import json
import os
import subprocess
import sys

from conftest import ROOT

TOOL = os.path.join(ROOT, "tools", "finetune.py")


def run(*args, cwd, env=None):
    return subprocess.run([sys.executable, TOOL, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


def test_cli_runs_a_regime_on_a_folder(tmp_path, image_folder):
    result = run("--regime=small_similar", f"--config={ROOT}/configs/smoke.py",
                 f"--dataset={image_folder}", "--epochs=2", "--workdir=out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    assert metrics["regime"] == "small_similar"
    assert metrics["backbone"] == "mobilenet_v3_small"
    assert metrics["class_names"] == ["cat", "dog", "fox"]
    assert metrics["epochs_run"] == 2
    assert metrics["train_examples"] + metrics["val_examples"] == 20
    assert "Run folder: out" in result.stdout and "val_accuracy:" in result.stdout


def last_line(result):
    return result.stderr.strip().splitlines()[-1]


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, image_folder):
    result = run("--regime=medium_similar", cwd=tmp_path)
    assert result.returncode == 2
    assert last_line(result) == (
        "finetune.py: error: unknown regime 'medium_similar'; valid regimes: "
        "small_similar, small_different, large_similar, large_different")

    result = run("--regime=small_similar", "--backbone=resnet5", f"--dataset={image_folder}",
                 "--weights=none", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown backbone 'resnet5'; valid backbones: efficientnet_lite0" in last_line(result)

    result = run("--regime=small_similar", "--epochs=many", cwd=tmp_path)
    assert result.returncode == 2 and "epochs" in last_line(result)

    result = run("--regime=small_similar", "--config.no_such_key=1", cwd=tmp_path)
    assert result.returncode == 2 and "no_such_key" in last_line(result)

    result = run("--regime=small_different", f"--config={ROOT}/configs/smoke.py",
                 "--cut=conv9", f"--dataset={image_folder}", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown cut 'conv9'" in last_line(result) and "nearest layer names" in last_line(result)
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")


def test_cli_imagenet_weights_without_network_is_one_line(tmp_path, image_folder):
    # No network: every HTTPS request goes to a closed local port. An empty
    # KERAS_HOME makes sure no cached download hides the failure.
    env = dict(os.environ, https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               KERAS_HOME=str(tmp_path / "keras_home"))
    result = run("--regime=small_similar", "--backbone=resnet50", "--weights=imagenet",
                 "--image_size=32", f"--dataset={image_folder}", "--workdir=out",
                 cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    line = last_line(result)
    assert line.startswith("finetune.py: error: could not download ImageNet weights for 'resnet50'")
    for hint in ("network", "--weights=PATH.weights.h5", "efficientnet_lite0"):
        assert hint in line
    assert "Traceback" not in result.stderr


def test_the_default_run_is_offline_pretrained():
    from configs import small_similar
    from tl_keras import backbones, train

    config = train.resolve(small_similar.get_config())
    assert (config.backbone, config.weights, config.dataset, config.image_size) == (
        "efficientnet_lite0", "imagenet", "fashion_mnist", 96)
    assert config.backbone in backbones.OFFLINE_IMAGENET
