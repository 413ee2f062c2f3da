"""The learning-rate range test: nothing it trains stays, its suggestion follows its rule."""

import json
import os

import numpy as np
import pytest

from conftest import TINY_BACKBONE, TINY_SIZE, tiny_arrays
from tl_keras import backbones, lr_find, model as model_lib, recipe, trainable


def _model():
    cut = backbones.build_backbone(TINY_BACKBONE, weights="none", image_size=TINY_SIZE)
    return model_lib.build_classifier(cut.model, TINY_BACKBONE, 3, seed=0)


@pytest.mark.graph  # 100 steps: tracing once is cheaper
def test_the_range_test_puts_every_weight_back_and_suggests_a_tenth_of_the_lowest():
    x, y = tiny_arrays(32)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    model = _model()
    phase = trainable.Phase("finetune", "all", 0, 1, 1e-3, True,
                            stage_ends=backbones.stage_ends(TINY_BACKBONE),
                            recipe=recipe.Recipe(layer_decay=0.5))
    before = [w.copy() for w in model.get_weights()]  # BatchNorm statistics included
    test = lr_find.range_test(model, phase, batches, "sparse_categorical_crossentropy",
                              steps=30, min_rate=1e-4, max_rate=10.0)
    for after, saved in zip(model.get_weights(), before):
        np.testing.assert_array_equal(after, saved)
    assert np.all(np.diff(test.rates) > 0) and test.rates[0] == pytest.approx(1e-4)
    assert len(test.rates) == len(test.losses) <= 30
    lowest = int(np.argmin(test.losses))
    assert test.suggestion == pytest.approx(test.rates[lowest] / 10)
    assert test.rates[0] <= test.steepest <= test.rates[lowest]
    assert test.losses[-1] > test.losses[lowest]  # the loss rose again at high rates


@pytest.mark.slow
def test_lr_find_tool_writes_its_picture_and_names_the_key_to_set(run_tool, shared_images,
                                                                  tmp_path):
    workdir = tmp_path / "lr"
    result = run_tool("lr_find.py", "--regime=large_similar", f"--dataset={shared_images}",
                      f"--backbone={TINY_BACKBONE}", "--weights=none",
                      f"--image_size={TINY_SIZE}", "--batch_size=4", "--steps=6",
                      "--min_rate=1e-3", "--max_rate=0.03", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    saved = json.loads((workdir / "lr_find.json").read_text())
    assert saved["phase"] == "finetune" and saved["key"] == "finetune_learning_rate"
    assert (workdir / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The measured command, as a run: its data, backbone, size and batch (the dataset
    # was fashion_mnist, the config's, whatever --dataset said), the rate set.
    assert result.stdout.splitlines()[-1] == (
        "Train with it: python tools/finetune.py --regime=large_similar "
        f"--config.finetune_learning_rate={saved['suggestion']:.2g} --dataset={shared_images} "
        f"--backbone={TINY_BACKBONE} --weights=none --image_size={TINY_SIZE} --batch_size=4")
    # The same workdir again: refused, nothing overwritten.
    again = run_tool("lr_find.py", "--regime=large_similar", f"--dataset={shared_images}",
                     f"--backbone={TINY_BACKBONE}", "--weights=none",
                     f"--image_size={TINY_SIZE}", "--steps=6", "--min_rate=1e-3",
                     "--max_rate=0.03", f"--workdir={workdir}")
    assert again.returncode == 2
    assert again.last_line().endswith("is not empty; choose another --workdir")


def test_lr_find_tool_names_the_phases_a_regime_has(run_tool, shared_images, tmp_path):
    result = run_tool("lr_find.py", "--regime=small_similar", f"--dataset={shared_images}",
                      f"--backbone={TINY_BACKBONE}", "--weights=none", "--phase=finetune",
                      f"--workdir={tmp_path / 'lr'}")
    assert result.returncode == 2
    assert result.last_line() == ("lr_find.py: error: regime 'small_similar' has no phase "
                                  "'finetune'; its phases: head")
    assert not os.path.exists(tmp_path / "lr")
