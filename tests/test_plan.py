"""A config resolved once into an immutable plan, every bad setting refused first."""

import json
import re

import os

import pytest

from conftest import TINY_BACKBONE, tiny_config
from tl_keras import plan as plan_lib


def test_resolve_fills_in_what_the_regime_and_backbone_decide(tmp_path):
    config = tiny_config(tmp_path, "small_different", image_size=0, init="pretrained")
    plan = plan_lib.resolve(config)
    assert (plan.cut, plan.cut_layer) == ("early", "expanded_conv_project_bn")
    assert plan.image_size == 224  # image_size 0: the backbone's own
    assert [(p.name, p.train) for p in plan.phases] == [("head", "head")]
    assert plan.loss == "sparse_categorical_crossentropy"
    assert (plan.weights, plan.distribution) == ("none", "auto")  # the smoke config's
    assert config.cut is None and config.image_size == 0  # the config is not changed
    assert plan_lib.resolve(plan) is plan  # a plan is resolved already

    scratch = plan_lib.resolve(tiny_config(tmp_path, "large_different", init="scratch",
                                           weights="imagenet"))
    assert scratch.weights == "none"  # init=scratch: every weight random
    assert [p.name for p in scratch.phases] == ["scratch"]


def test_a_plan_cannot_change_and_writes_what_it_resolved(tmp_path):
    plan = plan_lib.resolve(tiny_config(tmp_path, "large_similar", cut="late"))
    with pytest.raises(AttributeError):
        plan.config.epochs = 100
    with pytest.raises(AttributeError):
        plan.cut = "top"
    settings = plan.to_dict()
    assert json.loads(json.dumps(settings)) == settings
    assert (settings["cut"], settings["image_size"], settings["regime"]) == ("late", 32,
                                                                             "large_similar")
    moved = plan.with_workdir(str(tmp_path / "elsewhere"))
    assert moved.config.workdir == str(tmp_path / "elsewhere")
    assert plan.config.workdir == str(tmp_path / "run")
    assert moved.phases == plan.phases and moved.cut_layer == plan.cut_layer


@pytest.mark.parametrize("overrides, message", [
    ({"regime": "medium_similar"}, "unknown regime 'medium_similar'; valid regimes: "),
    ({"backbone": "resnet5"}, "unknown backbone 'resnet5'; valid backbones: "),
    ({"regime": "small_different", "cut": "top"}, "cuts at early, middle or late"),
    ({"init": "random"}, "unknown init 'random'; valid inits: pretrained, scratch"),
    ({"epochs": 0}, "epochs must be at least 1, got 0"),
    ({"batch_size": -4}, "batch_size must be at least 1, got -4"),
    ({"distribution": "gpus"}, "unknown distribution 'gpus'; valid: auto, none, mirrored"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\), got 1.0"),
    ({"examples_per_class": -2}, r"examples_per_class must be 0 \(all\) or more, got -2"),
    ({"max_examples": -5}, r"max_examples must be 0 \(all\) or more, got -5"),
    ({"image_size": -5}, r"image_size must be 0 \(the backbone's own\) or more, got -5"),
    ({"image_size": 5000}, "image_size must be at most 2048, got 5000"),
    ({"learning_rate": 0.0}, "learning_rate must be above 0, got 0.0"),
    ({"finetune_learning_rate": -1e-5}, "finetune_learning_rate must be above 0, got -1e-05"),
    ({"cached_views": 0}, "cached_views must be at least 1, got 0"),
    ({"pool_grid": 0}, r"pool_grid must be 1 \(global average\) or more, got 0"),
    ({"mixed_precision": "float8"}, "unknown mixed_precision 'float8'; valid: '', 'float32', "),
    ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\), got 1.0"),
    ({"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
    ({"augment_zoom": -1.0}, r"augment_zoom must be in \[0, 1\), got -1.0"),
    ({"weight_decay": -1.0}, "weight_decay must be 0 or more, got -1.0"),
    ({"augment_flip": "diagonal"}, "unknown augment_flip 'diagonal'; valid: horizontal, vertical, "
                                   "horizontal_and_vertical, none"),
    ({"verbose": "7"}, "unknown verbose '7'; valid: auto, 0, 1, 2"),
    ({"validation_freq": 0}, "validation_freq must be at least 1, got 0"),
    ({"head_steps_per_execution": 0}, "head_steps_per_execution must be at least 1, got 0"),
    ({"inference_batch_size": -1}, r"inference_batch_size must be 0 \(the training batch "
                                   r"size\) or more, got -1"),
    # What a hostile probe found accepted (a run of nan losses, or a phase skipped):
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number, got inf"),
    ({"advisor": {"scratch_margin": float("nan")}},
     "advisor.scratch_margin must be a finite number, got nan"),
    ({"head_epochs": -1}, r"head_epochs must be 0 \(no head phase\) or more, got -1"),
    ({"scratch_batchnorm_momentum": 5.0},
     r"scratch_batchnorm_momentum must be in \[0, 1\), got 5.0"),
    ({"advisor": {"sample": -5}}, "advisor.sample must be at least 2, got -5"),
    ({"advisor": {"similar_margin": -1.0}}, "advisor.similar_margin must be 0 or more, got -1.0"),
    ({"advisor": {"pilot_held_out": 1.0}},
     "advisor.pilot_held_out must be between 0 and 1, got 1.0"),
    ({"advisor": {"pilot_passes": 0.0}}, "advisor.pilot_passes must be above 0, got 0.0"),
    ({"advisor": {"pilot_epochs": 0}}, "advisor.pilot_epochs must be at least 1, got 0"),
    ({"backbone": "seed_cnn,mobilenet_v2"}, "--backbone=seed_cnn,mobilenet_v2 names several "
                                            "backbones: only tools/advise.py and"),
    ({"rand_augment": -1}, r"rand_augment must be 0 \(off\) or more, got -1"),
    ({"rand_augment_magnitude": 1.5}, r"rand_augment_magnitude must be in \[0, 1\], got 1.5"),
    ({"advisor": {"scratch_pilot": "small"}},
     "unknown advisor.scratch_pilot 'small'; valid: large, always, never"),
    ({"feature_cache_bytes": -1}, r"feature_cache_bytes must be 0 \(features on disk\) or more"),
    ({"weights": "/no/such.weights.h5"},
     r"--weights='/no/such.weights.h5' is not 'imagenet', 'none' or an existing \.weights\.h5"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        plan_lib.resolve(tiny_config(tmp_path, **overrides))


def test_the_workdir_is_normalised_and_must_be_a_writable_folder(tmp_path):
    plan = plan_lib.resolve(tiny_config(tmp_path, workdir=str(tmp_path / "runs" / "a") + "/"))
    assert plan.config.workdir == str(tmp_path / "runs" / "a")  # a trailing slash: the same run
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="workdir '.*a_file' is a file, not a folder"):
        plan_lib.resolve(tiny_config(tmp_path, workdir=str(tmp_path / "a_file")))
    with pytest.raises(ValueError, match="cannot create workdir '.*a_file/run': '.*a_file' is "
                                         "a file"):
        plan_lib.resolve(tiny_config(tmp_path, workdir=str(tmp_path / "a_file" / "run")))
    # Root passes every permission check, so a folder where nobody can create one:
    with pytest.raises(ValueError, match=r"cannot create the run folder in '/proc': "):
        plan_lib.resolve(tiny_config(tmp_path, workdir="/proc/no/run"))
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # the checks leave nothing behind


def test_every_default_has_one_home_in_base(tmp_path):
    from tl_keras.configs import base

    # A config without a key (an older run's config.json) takes base.py's default,
    # and resolve reads the same default train.py and distribute.py use.
    old = {k: v for k, v in plan_lib.to_dict(tiny_config(tmp_path)).items()
           if k not in ("head_steps_per_execution", "distribution", "feature_cache_bytes")}
    merged = plan_lib.with_defaults(old)
    defaults = base.get_config()
    for key in ("head_steps_per_execution", "distribution", "feature_cache_bytes"):
        assert merged[key] == defaults[key]
    assert merged.epochs == 2 and merged.backbone == TINY_BACKBONE  # the given ones
    plan = plan_lib.resolve(merged)
    assert (plan.config.head_steps_per_execution, plan.distribution) == (32, "auto")
    # No fallback default hides anywhere else in the package: config.get(KEY, DEFAULT).
    package = os.path.join(os.path.dirname(plan_lib.__file__))
    for root, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    text = f.read()
                assert not re.search(r"\bconfig\.get\([^()]*,", text), name


def test_a_locked_config_file_still_takes_the_advice(tmp_path):
    # ml_collections' --config=FILE locks the config; --regime=auto then adds `advice`
    # (a traceback before: "Key 'advice' does not exist and cannot be added").
    config = tiny_config(tmp_path)
    config.lock()
    for source in (config, plan_lib.resolve(config).config):
        copy = plan_lib.editable(source)
        copy.advice = {"regime": "small_similar"}
        assert copy.advice.regime == "small_similar"


def test_editable_copies_are_independent(tmp_path):
    # FrozenConfigDict.as_configdict() hands back one cached dict: two "copies" of a
    # plan's config were one object, so a pilot's epochs and workdir became the run's.
    frozen = plan_lib.resolve(tiny_config(tmp_path)).config
    first, second = plan_lib.editable(frozen), plan_lib.editable(frozen)
    second.epochs, second.advisor.sample = 99, 7
    assert (first.epochs, first.advisor.sample) == (frozen.epochs, frozen.advisor.sample) == (
        2, 2000)


def test_a_resumed_run_with_another_config_names_a_few_of_the_keys_that_differ(tmp_path):
    # The probe's case: a config.json that differs in many nested keys listed all of them
    # (~900 characters). Eight at most, and how many more.
    from tl_keras import run_folder

    workdir = tmp_path / "run"
    workdir.mkdir()
    old = {"epochs": 1, "advice": {f"score_{i}": i for i in range(30)}}
    (workdir / "config.json").write_text(json.dumps(old))
    new = {"epochs": 2, "advice": {f"score_{i}": -i for i in range(30)}}
    with pytest.raises(run_folder.RunFolderError) as error:
        run_folder.check(str(workdir), new)
    message = str(error.value)
    assert "(differs in: epochs, score_1, score_10, score_11, score_12, score_13, score_14, " \
           "score_15 and 22 more)" in message
    assert len(message.replace(str(workdir), "")) < 250
