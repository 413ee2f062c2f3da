"""What each regime freezes and trains, checked on weights after a real `fit`."""

import math
import os

import keras
import numpy as np
import pytest

from conftest import tiny_arrays, tiny_config
from tl_keras import plan as plan_lib, train, trainable


def batchnorm_layers(model):
    return [l for l in trainable._sublayers(model.get_layer("backbone"))
            if isinstance(l, keras.layers.BatchNormalization)]


def snapshot(model):
    backbone = model.get_layer("backbone")
    return {
        "kernels": {w.path: w.numpy().copy() for w in backbone.weights
                    if "kernel" in w.path},
        "bn": {w.path: w.numpy().copy() for l in batchnorm_layers(model) for w in l.weights},
        "head": model.get_layer("predictions").kernel.numpy().copy(),
    }


def fit_phase(model, phase, epochs=1):
    trainable.apply_phase(model, phase)
    model.compile(optimizer=keras.optimizers.AdamW(phase.learning_rate), jit_compile=False,
                  loss="sparse_categorical_crossentropy")
    x, y = tiny_arrays(n=16, num_classes=3)
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0)


def size(weights):
    return sum(math.prod(w.shape) for w in weights)


@pytest.mark.parametrize("regime", ["small_similar", "small_different"])
def test_frozen_regimes_train_only_the_head(tmp_path, regime):
    plan = plan_lib.resolve(tiny_config(tmp_path, regime))
    model, cut_layer = train.build(plan, num_classes=3, channels=3)
    assert cut_layer == plan.cut_layer == ("re_lu_22" if regime == "small_similar"
                                           else "expanded_conv_project_bn")
    [phase] = plan.phases
    trainable.apply_phase(model, phase)
    head = model.get_layer("predictions")
    features = model.get_layer("backbone").output.shape[-1]
    assert trainable.count_params(model) == (
        features * 3 + 3, model.count_params() - (features * 3 + 3))
    assert [w.path for w in model.trainable_weights] == [w.path for w in head.weights]

    before = snapshot(model)
    fit_phase(model, phase)
    after = snapshot(model)
    for path, value in before["kernels"].items():
        np.testing.assert_array_equal(value, after["kernels"][path], err_msg=path)
    for path, value in before["bn"].items():  # moving_mean, moving_variance, gamma, beta
        np.testing.assert_array_equal(value, after["bn"][path], err_msg=path)
    assert before["bn"], "the backbone has BatchNorm layers to check"
    assert not np.array_equal(before["head"], after["head"])


def test_large_similar_phase_two_trains_everything_but_batchnorm(tmp_path):
    plan = plan_lib.resolve(tiny_config(tmp_path, "large_similar"))
    model, _ = train.build(plan, num_classes=3, channels=3)
    head_phase, finetune_phase = plan.phases
    assert (head_phase.train, finetune_phase.train) == ("head", "all")
    assert finetune_phase.learning_rate == plan.config.finetune_learning_rate == 3e-4

    fit_phase(model, head_phase)
    trainable.apply_phase(model, finetune_phase)
    bn_size = size(w for l in batchnorm_layers(model) for w in l.weights)
    fixed = size(model.get_layer("preprocess").weights) + size(
        model.get_layer("feature_norm").weights)  # never trained
    assert trainable.count_params(model) == (
        model.count_params() - bn_size - fixed, bn_size + fixed)

    finetune_phase = trainable.Phase("finetune", "all", 1, 2, 1e-3, True)  # visible steps
    before = snapshot(model)
    fit_phase(model, finetune_phase)
    after = snapshot(model)
    changed = [p for p, v in before["kernels"].items() if not np.array_equal(v, after["kernels"][p])]
    assert len(changed) == len(before["kernels"])  # every conv kernel trained
    for path, value in before["bn"].items():
        np.testing.assert_array_equal(value, after["bn"][path], err_msg=path)
    assert not np.array_equal(before["head"], after["head"])


@pytest.mark.slow
def test_scratch_starts_from_random_weights_and_trains_batchnorm(tmp_path):
    keras.utils.set_random_seed(123)
    pretrained = train.build(plan_lib.resolve(tiny_config(tmp_path, "large_different")), 3, 3)[0]
    path = str(tmp_path / "pretrained.weights.h5")
    pretrained.get_layer("backbone").save_weights(path)
    base = tiny_config(tmp_path, "large_different", weights=path)

    loaded, _ = train.build(plan_lib.resolve(base), 3, 3)
    for a, b in zip(loaded.get_layer("backbone").weights, pretrained.get_layer("backbone").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    scratch_plan = plan_lib.resolve(tiny_config(tmp_path, "large_different", weights=path,
                                                init="scratch"))
    scratch, _ = train.build(scratch_plan, 3, 3)
    kernels = [(a, b) for a, b in zip(scratch.get_layer("backbone").weights,
                                      pretrained.get_layer("backbone").weights)
               if "kernel" in a.path]
    assert all(not np.array_equal(a.numpy(), b.numpy()) for a, b in kernels)

    [phase] = scratch_plan.phases
    assert (phase.train, phase.freeze_batchnorm) == ("all", False)
    trainable.apply_phase(scratch, phase)
    assert {l.momentum for l in batchnorm_layers(scratch)} == {0.9}
    before = snapshot(scratch)
    fit_phase(scratch, phase)
    after = snapshot(scratch)
    moving = [p for p in before["bn"] if "moving_mean" in p]
    assert moving and all(not np.array_equal(before["bn"][p], after["bn"][p]) for p in moving)


def test_phase_plans_and_bad_values(tmp_path):
    config = tiny_config(tmp_path, "large_similar", epochs=5, head_epochs=2)
    assert [(p.name, p.first_epoch, p.last_epoch) for p in trainable.plan_phases(config)] == [
        ("head", 0, 2), ("finetune", 2, 5)]
    with pytest.raises(ValueError, match="valid regimes: small_similar, small_different"):
        trainable.plan_phases(tiny_config(tmp_path, "medium_similar"))
    with pytest.raises(ValueError, match="use large_different"):
        trainable.plan_phases(tiny_config(tmp_path, "small_similar", init="scratch"))
    with pytest.raises(ValueError, match="cuts at early, middle or late"):
        plan_lib.resolve(tiny_config(tmp_path, "small_different", cut="top"))
    with pytest.raises(ValueError, match="valid inits: pretrained, scratch"):
        trainable.plan_phases(tiny_config(tmp_path, "large_different", init="random"))
    plan = plan_lib.resolve(tiny_config(tmp_path, "small_different", cut="middle"))
    assert (plan.cut, plan.cut_layer) == ("middle", "expanded_conv_2_add")


@pytest.mark.parametrize("unfreeze, cut, stages_frozen", [
    (1, "top", "expanded_conv_7_add"),      # the top stage trains: everything after "late"
    (1, "middle", "expanded_conv_project_bn"),  # a middle cut has two stages
    (2, "middle", None),                    # as many stages as there are: all of them train
])
def test_phase_two_unfreezes_only_the_top_stages(tmp_path, unfreeze, cut, stages_frozen):
    plan = plan_lib.resolve(tiny_config(tmp_path, "large_similar", cut=cut, unfreeze=unfreeze))
    model, _ = train.build(plan, num_classes=3, channels=3)
    head_phase, finetune_phase = plan.phases
    assert finetune_phase.unfreeze == unfreeze
    fit_phase(model, head_phase)
    finetune_phase = trainable.Phase("finetune", "all", 1, 2, 1e-3, True, unfreeze=unfreeze,
                                     stage_ends=finetune_phase.stage_ends)  # visible steps
    backbone = model.get_layer("backbone")
    names = [layer.name for layer in backbone.layers]
    boundary = names.index(stages_frozen) + 1 if stages_frozen else 0
    below = {w.path for layer in backbone.layers[:boundary] for w in layer.weights}

    before = snapshot(model)
    fit_phase(model, finetune_phase)
    after = snapshot(model)
    changed = {p for p, v in before["kernels"].items() if not np.array_equal(v, after["kernels"][p])}
    assert changed == set(before["kernels"]) - below  # every kernel above trained, none below
    assert changed and (below or stages_frozen is None)
    for path, value in before["bn"].items():
        np.testing.assert_array_equal(value, after["bn"][path], err_msg=path)


def test_unfreeze_is_for_phase_two_only(tmp_path):
    with pytest.raises(ValueError, match="unfreeze applies to phase 2 of the large regimes"):
        trainable.plan_phases(tiny_config(tmp_path, "small_similar", unfreeze=1))
    with pytest.raises(ValueError, match="unfreeze must be 0"):
        trainable.plan_phases(tiny_config(tmp_path, "large_similar", unfreeze=-1))


@pytest.mark.slow
def test_lora_trains_adapters_alone_and_saves_them_merged(tmp_path, shared_images):
    from tl_keras import data, model as model_lib, train

    config = tiny_config(tmp_path, "large_similar", dataset=str(shared_images), lora_rank=2,
                         epochs=1, head_epochs=0, finetune_learning_rate=0.05)
    model, _ = train.build(config, 3, 3)
    before = {v.path: v.numpy().copy() for v in model.get_layer("backbone").weights}
    metrics = train.finetune(config, data.load(config, image_size=config.image_size), model=model)
    backbone = model.get_layer("backbone")
    adapters = [v for v in backbone.weights if "lora_kernel" in v.path]
    assert adapters and all(v.trainable for v in adapters)
    # Every weight the backbone had stays as it was: kernels, BatchNorm, depthwise.
    for variable in backbone.weights:
        if variable.path in before:
            np.testing.assert_array_equal(variable.numpy(), before[variable.path], variable.path)
    assert any(np.abs(v.numpy()).max() > 0 for v in adapters if "lora_kernel_b" in v.path)
    assert metrics["trainable_params"] < sum(v.size for v in before.values()) / 2
    # model.keras: the adapters merged into plain kernels, the same outputs.
    saved = model_lib.load_model(os.path.join(config.workdir, "model.keras"))
    assert "lora" not in open_config(os.path.join(config.workdir, "model.keras"))
    assert not any(getattr(layer, "lora_enabled", False)
                   for layer in saved.get_layer("backbone").layers)
    x = np.random.default_rng(0).integers(0, 255, (4, config.image_size, config.image_size, 3))
    np.testing.assert_allclose(saved.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-5)
    kernels = [v for v in saved.get_layer("backbone").weights
               if v.path in before and v.path.endswith("/kernel")]
    assert kernels and any(not np.allclose(v.numpy(), before[v.path]) for v in kernels)


def open_config(path):
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return archive.read("config.json").decode()


def test_a_frozen_backbone_drops_nothing_so_fit_sees_the_cached_features(tmp_path):
    # EfficientNet's stochastic depth is Dropout inside the backbone: Keras runs it in
    # `fit` whatever `trainable` says, so a head trained by plain `fit` on a frozen
    # backbone saw randomly dropped blocks, the cached head the whole backbone (issue 38).
    from tl_keras import features

    config = tiny_config(tmp_path, "large_similar", backbone="efficientnet_lite0")
    plan = plan_lib.resolve(config)
    model, _ = train.build(plan, 3, 3)
    extract = features.extractor(model)
    dropouts = [layer for layer in trainable._sublayers(model.get_layer("backbone"))
                if isinstance(layer, keras.layers.Dropout)]
    rates = [layer.rate for layer in dropouts]
    assert dropouts and max(rates) > 0
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    head, finetune = plan.phases
    trainable.apply_phase(model, head)
    np.testing.assert_array_equal(extract(x, training=True), extract(x, training=False))
    trainable.apply_phase(model, finetune)  # the backbone trains: its own dropout again
    assert [layer.rate for layer in dropouts] == rates
    assert not np.allclose(extract(x, training=True), extract(x, training=False))
