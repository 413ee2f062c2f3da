"""tools/benchmark.py on tiny settings: it runs to the end and its results hold together."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_benchmark_writes_consistent_results(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"),
         "--backbone=mobilenet_v3_small", "--weights=none", "--image_size=32",
         "--dataset=digits", "--train_examples=100", "--val_examples=24", "--epochs=2",
         "--finetune_examples=32", "--finetune_epochs=1", "--tune_trials=3",
         "--speed_train_examples=40", "--speed_val_examples=30", "--speed_rounds=1",
         f"--out={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.load(open(out))
    frozen, full = r["frozen_regime"], r["full_finetune"]
    assert (frozen["train_examples"], frozen["val_examples"], frozen["epochs"]) == (100, 24, 2)
    # The two paths it times train the same model: the full model's outputs
    # equal the head's on the cached features.
    assert frozen["full_model_vs_head_max_abs_difference"] < 1e-5
    assert full["images"] == 32 and full["model_only_images_per_second"] > 0
    assert r["backend"] == "tensorflow" and "speedup" in result.stdout
    # Part 4 times what it says: the first trial at each cut computes its
    # features, every later trial at that cut reuses them.
    tuning = r["tuning"]
    assert tuning["trials"] == 3 and len(tuning["rss_mb_after_each_trial"]) == 3
    cuts, reused = tuning["cut_layer_of_each_trial"], tuning["reused_features_in_each_trial"]
    assert reused == [cut in cuts[:i] for i, cut in enumerate(cuts)]
    assert tuning["trials_computing_features"] == len(set(cuts))
    # Part 5 trains every regime and sets the advisor's time against theirs.
    advisor = r["advisor"]
    assert list(advisor["regimes"]) == ["small_similar", "small_different", "large_similar",
                                        "large_different"]
    assert advisor["advisor_over_four_regimes"] == pytest.approx(
        advisor["advisor_seconds"] / advisor["four_regimes_seconds"], abs=0.01)
    assert advisor["advice"]["regime"] in advisor["regimes"] and advisor["sample"] == 100
    # Parts 6-7 time the old and the new feature pass on the same images (the
    # same features, labels in the same order) and the head phase on those features.
    passes, head = r["speed"]["feature_pass"], r["speed"]["head_phase"]
    assert passes["images"] == 70 and passes["same_labels"]
    assert passes["max_abs_difference"] <= 1e-5 * max(1.0, passes["max_abs_feature"])
    assert set(head["runs"]) == {"one_step_per_call", "steps_per_execution"}
    # Training on the same cached features, one or 32 steps per call: the same head.
    [old], [new] = head["runs"]["one_step_per_call"], head["runs"]["steps_per_execution"]
    assert old["val_accuracy"] == new["val_accuracy"]
    assert "pytorch_peer" not in r["speed"]  # no --peer_python: no part 8


# As on a GPU machine that has Keras and JAX but no TensorFlow: importing it
# fails. (Not sys.modules["tensorflow"] = None: Keras takes a key there for a
# loaded TensorFlow.)
_WITHOUT_TENSORFLOW = """
import os, runpy, sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
            raise ImportError(f"No module named {name!r} (blocked: no TensorFlow here)")

sys.meta_path.insert(0, NoTensorFlow())
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python tools/X.py` does
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_benchmark_runs_on_jax_without_tensorflow(tmp_path):
    pytest.importorskip("jax", reason="pip install jax (the [test] extra has it)")
    out = tmp_path / "results.json"
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, os.path.join(ROOT, "tools", "benchmark.py"),
         "--backbone=mobilenet_v3_small", "--weights=none", "--image_size=32",
         "--dataset=digits", "--train_examples=48", "--val_examples=24", "--epochs=2",
         "--finetune_examples=32", "--finetune_epochs=1", "--tune_trials=2", f"--out={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.load(open(out))
    frozen, full = r["frozen_regime"], r["full_finetune"]
    assert r["backend"] == "jax" and r["device"].startswith("CPU")
    assert (frozen["train_examples"], frozen["val_examples"]) == (48, 24)
    assert frozen["full_model_vs_head_max_abs_difference"] < 1e-5
    assert full["images"] == 32 and "tl_keras_pipeline_images_per_second" not in full
    # Part 4: finetune's trials run without TensorFlow too (no TensorBoard logs then).
    assert r["tuning"]["trials"] == 2 and r["tuning"]["best_val_accuracy"] > 0
