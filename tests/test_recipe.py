"""The recipe: schedules, layer-wise rates, clipping, weight averaging, early stopping."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

from conftest import TINY_BACKBONE, TINY_SIZE, tiny_arrays, tiny_config
from tl_keras import backbones, model as model_lib, plan as plan_lib, recipe, trainable


def _phase(train="all", first=0, last=1, rate=0.1, **recipe_kwargs):
    return trainable.Phase("finetune", train, first, last, rate, True,
                           stage_ends=backbones.stage_ends(TINY_BACKBONE),
                           recipe=recipe.Recipe(**recipe_kwargs))


def _classifier(seed=0):
    cut = backbones.build_backbone(TINY_BACKBONE, weights="none", image_size=TINY_SIZE)
    return model_lib.build_classifier(cut.model, TINY_BACKBONE, 3, dropout=0.0, seed=seed)


def _rates(schedule, steps):
    return np.array([float(schedule(t)) for t in range(steps + 1)])


def test_cosine_warms_up_linearly_to_the_peak_then_decays_to_zero():
    rates = _rates(recipe.schedule(recipe.Recipe(schedule="cosine", warmup=0.1), 0.3, 100), 100)
    np.testing.assert_allclose(rates[:11], np.linspace(0, 0.3, 11), rtol=1e-5, atol=1e-7)
    assert np.all(np.diff(rates[10:]) <= 1e-9)  # never rises after the warm-up
    np.testing.assert_allclose(rates[55], 0.15, rtol=1e-4)  # halfway down the cosine
    assert rates[100] == pytest.approx(0, abs=1e-7)


def test_steps_divide_the_rate_by_ten_at_30_60_90_percent_after_the_warm_up():
    rates = _rates(recipe.schedule(recipe.Recipe(schedule="steps", warmup=0.05), 1.0, 100), 100)
    np.testing.assert_allclose(rates[:6], np.linspace(0, 1, 6), rtol=1e-6)
    np.testing.assert_allclose(rates[[10, 29, 30, 59, 60, 89, 90, 100]],
                               [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)


def test_a_constant_rate_without_warm_up_is_a_plain_number():
    assert recipe.schedule(recipe.Recipe(), 0.01, 100) == 0.01
    opt = recipe.optimizer(_phase(rate=0.01), steps_per_epoch=10)
    assert type(opt) is keras.optimizers.AdamW and opt.weight_decay == 0.0


def _gradients_and_step(phase, x, y):
    """A model under `phase`, its gradients on (x, y), and its weights' change after one
    step of the recipe's optimizer on the same batch."""
    import tensorflow as tf

    model = _classifier()
    trainable.apply_phase(model, phase)
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
        loss = tf.reduce_mean(loss)
    grads = {v.path: g.numpy() for v, g in zip(model.trainable_variables,
                                              tape.gradient(loss, model.trainable_variables))}
    model.compile(optimizer=recipe.optimizer(phase, steps_per_epoch=1, model=model),
                  loss="sparse_categorical_crossentropy")
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    model.train_on_batch(x, y)
    steps = {v.path: v.numpy() - before[v.path] for v in model.trainable_variables}
    return model, grads, steps


def test_layer_decay_scales_each_stage_s_update_by_its_factor():
    x, y = tiny_arrays(8)
    phase = _phase(optimizer="sgd", layer_decay=0.5, rate=0.1)
    model, grads, steps = _gradients_and_step(phase, x, y)
    scales = recipe.rate_scales(model, phase, 0.5)
    assert type(model.optimizer) is recipe.LayerwiseSGD
    # The head trains at the full rate; the top stage at 0.5, the lowest at 0.5^4.
    assert "predictions/kernel" not in scales
    assert sorted(set(scales.values())) == [0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5]
    stem = next(layer for layer in model.get_layer("backbone").layers if layer.trainable_weights)
    assert scales[stem.trainable_weights[0].path] == 0.5 ** 4
    for path, grad in grads.items():  # SGD's first step: -rate x factor x gradient
        np.testing.assert_allclose(steps[path], -0.1 * scales.get(path, 1.0) * grad,
                                   rtol=1e-3, atol=1e-7, err_msg=path)


def test_clipnorm_bounds_the_global_gradient_norm():
    x, y = tiny_arrays(8)
    _, grads, steps = _gradients_and_step(_phase(optimizer="sgd", clipnorm=1e-3, rate=1.0), x, y)
    norm = lambda d: np.sqrt(sum(np.sum(v ** 2) for v in d.values()))  # noqa: E731
    assert norm(grads) > 1e-2  # far above the clip
    assert norm(steps) == pytest.approx(1e-3, rel=1e-3)  # rate 1 x the clipped gradient


def test_ema_validates_and_keeps_the_average_of_the_weights(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)).astype("float32"), np.arange(16) % 3
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    phase = _phase(rate=0.05, ema=0.5, last=2)
    model.compile(optimizer=recipe.optimizer(phase, steps_per_epoch=4),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    kernel = model.layers[-1].kernel
    seen, checked = [], []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(kernel.numpy().copy())

        def on_epoch_end(self, epoch, logs=None):  # after the swap: what best.keras saves
            checked.append(kernel.numpy().copy())

    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, validation_data=(x, y),
              callbacks=recipe.callbacks(phase, str(tmp_path)) + [Record()])
    average = seen[0]
    averages = [average]
    for weights in seen[1:]:
        average = 0.5 * average + 0.5 * weights
        averages.append(average)
    assert not np.allclose(averages[-1], seen[-1], atol=1e-5)  # the average is not the last step
    np.testing.assert_allclose(checked[0], averages[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernel.numpy(), averages[-1], rtol=1e-5, atol=1e-6)


def test_early_stopping_goes_on_counting_after_a_kill_and_restores_the_best(tmp_path):
    model = _classifier()
    best_model, record = tmp_path / "best.keras", tmp_path / "backup" / "best.json"
    phase = _phase(early_stopping=2, last=10)
    state = tmp_path / "backup" / "finetune.early_stopping.json"

    def callback():
        stop, = recipe.callbacks(phase, str(tmp_path), best_record=str(record))
        stop.set_model(model)
        stop.on_train_begin()
        return stop

    stop = callback()
    stop.on_epoch_end(0, {"val_accuracy": 0.5})  # the best: best.keras written at this epoch
    best = model.get_weights()
    model.save(best_model)
    record.write_text(json.dumps({"epoch": 1, "val_accuracy": 0.5}))
    model.set_weights([w + 1 for w in best])
    stop.on_epoch_end(1, {"val_accuracy": 0.4})
    assert json.loads(state.read_text()) == {"wait": 1, "best": 0.5, "best_epoch": 0}
    # Killed here; the resumed run's callback knows one epoch has passed without gain.
    model.stop_training = False
    stop = callback()
    stop.on_epoch_end(2, {"val_accuracy": 0.45})
    assert model.stop_training
    stop.on_train_end()
    for restored, saved in zip(model.get_weights(), best):
        np.testing.assert_array_equal(restored, saved)


@pytest.mark.parametrize("key, value, message", [
    ("optimizer", "adam", "unknown optimizer 'adam'; valid: adamw, sgd"),
    ("schedule", "linear", "unknown schedule 'linear'; valid: constant, cosine, steps, size_rule"),
    ("warmup", 1.0, "warmup must be a fraction in [0, 1), got 1.0"),
    ("layer_decay", 0.0, "layer_decay must be in (0, 1] (1: one rate), got 0.0"),
    ("ema", 1.0, "ema must be in [0, 1) (0: off), got 1.0"),
    ("clipnorm", -1.0, "clipnorm must be 0 (off) or more, got -1.0"),
    ("early_stopping", -1, "early_stopping must be 0 (off) or a number of epochs, got -1"),
])
def test_a_bad_recipe_setting_is_one_line(tmp_path, key, value, message):
    with pytest.raises(ValueError) as e:
        plan_lib.resolve(tiny_config(tmp_path, "large_similar", **{key: value}))
    assert str(e.value) == message


@pytest.mark.parametrize("key", ["ema", "early_stopping"])
def test_multi_worker_refuses_what_its_loop_cannot_run(tmp_path, key):
    with pytest.raises(ValueError, match="do not run with distribution=multi_worker"):
        plan_lib.resolve(tiny_config(tmp_path, "large_similar", distribution="multi_worker",
                                     **{key: 0.9 if key == "ema" else 2}))


def test_early_stopping_needs_every_epoch_validated(tmp_path):
    with pytest.raises(ValueError, match="early_stopping counts validated epochs"):
        plan_lib.resolve(tiny_config(tmp_path, "large_similar", early_stopping=2,
                                     validation_freq=2))


def test_the_recipe_applies_to_phases_that_train_the_backbone(tmp_path):
    plan = plan_lib.resolve(tiny_config(tmp_path, "large_similar", schedule="cosine",
                                        warmup=0.2, layer_decay=0.7, optimizer="sgd"))
    head, finetune = plan.phases
    assert head.recipe == recipe.Recipe(weight_decay=1e-4)  # a new head: constant AdamW
    assert (finetune.recipe.schedule, finetune.recipe.warmup, finetune.recipe.layer_decay,
            finetune.recipe.optimizer) == ("cosine", 0.2, 0.7, "sgd")


@pytest.mark.slow
def test_a_large_run_with_the_whole_recipe(tmp_path, shared_images, capsys):
    """Cosine with warm-up, layer decay, clipping, EMA, early stopping and CutMix in one
    run: BatchNorm stays frozen, the rate ends at 0, validation reads integer labels."""
    from tl_keras import data as data_lib, train

    config = tiny_config(tmp_path, "large_similar", dataset=str(shared_images), epochs=2,
                         head_epochs=1, batch_size=8, schedule="cosine", warmup=0.25,
                         layer_decay=0.5, clipnorm=1.0, ema=0.5, early_stopping=5,
                         batch_augment="cutmix", report=False)
    plan = plan_lib.resolve(config)
    data = data_lib.load(plan.config, image_size=plan.image_size)
    model, _ = train.build(plan, 3, 3)
    bn = [layer for layer in model.get_layer("backbone").layers
          if isinstance(layer, keras.layers.BatchNormalization)]
    moving = [layer.moving_mean.numpy().copy() for layer in bn]
    metrics = train.finetune(plan, data, model=model)
    assert metrics["epochs_run"] == 2
    assert ("learning rate 0.0003 (cosine schedule, 25% warm-up, layer decay 0.5, clipnorm 1, "
            "EMA 0.5, early stopping after 5, cutmix alpha 0.2)") in capsys.readouterr().out
    assert metrics["recipes"]["finetune"]["batch_augment"] == "cutmix"
    assert metrics["recipes"]["head"] == dataclasses.asdict(recipe.Recipe(weight_decay=1e-4))
    optimizer = model.optimizer
    assert type(optimizer) is recipe.LayerwiseAdamW
    assert int(optimizer.iterations) == train.steps_per_epoch(data, 8)
    assert float(optimizer.learning_rate) == pytest.approx(0, abs=1e-9)  # the cosine's end
    for layer, before in zip(bn, moving):
        np.testing.assert_array_equal(layer.moving_mean.numpy(), before)
    # The final metrics are the saved model's, measured on integer labels.
    saved = keras.saving.load_model(os.path.join(config.workdir, "model.keras"), compile=False)
    x = np.concatenate([b.numpy() for b, _ in data.val])
    y = np.concatenate([b.numpy() for _, b in data.val])
    assert metrics["val_accuracy"] == pytest.approx(
        np.mean(np.argmax(saved.predict(x, verbose=0), axis=1) == y), abs=1e-6)


def test_the_loss_and_accuracy_read_integer_and_mixed_labels_alike():
    from tl_keras import losses

    pred = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], "float32")
    loss = losses.SmoothedSparseCrossentropy(0.0)
    sparse = keras.losses.sparse_categorical_crossentropy(np.array([0, 2]), pred)
    np.testing.assert_allclose(loss(np.array([0, 2]), pred), np.mean(sparse), rtol=1e-6)
    soft = np.array([[0.6, 0.4, 0.0], [0.0, 0.3, 0.7]], "float32")
    expected = -np.mean(np.sum(soft * np.log(pred), axis=1))
    np.testing.assert_allclose(loss(soft, pred), expected, rtol=1e-5)
    np.testing.assert_array_equal(losses.accuracy(np.array([[0], [1]]), pred), [1, 0])
    np.testing.assert_array_equal(losses.accuracy(soft, pred), [1, 1])  # largest share


def test_the_size_rule_is_bit_s_hyperrule_by_the_number_of_images():
    rule = recipe.Recipe(schedule="size_rule", warmup=0.1)
    assert recipe.sized(rule, 5_000) == recipe.Recipe(schedule="steps", warmup=0.2)
    assert recipe.sized(rule, 50_000) == recipe.Recipe(
        schedule="steps", warmup=0.05, batch_augment="mixup", mix_alpha=0.1)
    assert recipe.sized(recipe.Recipe(schedule="cosine"), 50_000).batch_augment == "none"


def test_training_from_scratch_takes_the_recipe_at_one_rate(tmp_path):
    plan = plan_lib.resolve(tiny_config(tmp_path, "large_different", init="scratch",
                                        schedule="cosine", layer_decay=0.5))
    scratch, = plan.phases
    assert (scratch.recipe.schedule, scratch.recipe.layer_decay) == ("cosine", 1.0)


@pytest.mark.slow
def test_a_model_saved_with_layer_decay_loads_without_tl_keras_uncompiled(tmp_path):
    import subprocess
    import sys

    model = _classifier()
    phase = _phase(layer_decay=0.5, schedule="cosine", warmup=0.1)
    trainable.apply_phase(model, phase)
    model.compile(optimizer=recipe.optimizer(phase, 10, model),
                  loss="sparse_categorical_crossentropy")
    model.save(tmp_path / "m.keras")
    x = np.full((1, TINY_SIZE, TINY_SIZE, 3), 100, "uint8")
    np.save(tmp_path / "want.npy", model.predict(x, verbose=0))
    code = (f"import keras, numpy as np; m = keras.saving.load_model({str(tmp_path / 'm.keras')!r}, "
            f"compile=False); import sys; assert 'tl_keras' not in sys.modules; "
            f"np.testing.assert_allclose(m.predict(np.full((1, {TINY_SIZE}, {TINY_SIZE}, 3), 100, "
            f"'uint8'), verbose=0), np.load({str(tmp_path / 'want.npy')!r}), rtol=1e-5)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    # Compiled, after importing the recipe: the optimizer comes back with its rates.
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is recipe.LayerwiseAdamW
    assert loaded.optimizer.rate_scales == model.optimizer.rate_scales


def test_accumulated_gradients_equal_a_larger_batch_and_the_schedule_counts_updates():
    # 16 images: one update of a batch of 16, or two batches of 8 accumulated, for
    # two epochs under a cosine schedule (2 updates: the second at half the peak).
    # SGD with momentum; no BatchNorm or dropout in the way.
    x, y = tiny_arrays(16)
    x = x.reshape(16, -1)[:, :12].astype("float32") / 255

    def trained(batch_size, accumulate):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3)])
        phase = _phase(last=2, rate=0.5, optimizer="sgd", schedule="cosine",
                       accumulate=accumulate)
        model.compile(optimizer=recipe.optimizer(phase, steps_per_epoch=16 // batch_size),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
        return model.get_weights()

    for big, accumulated in zip(trained(16, 1), trained(8, 2)):
        np.testing.assert_allclose(big, accumulated, rtol=1e-5, atol=1e-6)
    assert not np.allclose(trained(8, 1)[0], trained(16, 1)[0])  # plain batches of 8 differ


def test_accumulate_and_lora_rank_refuse_nonsense_in_one_line(tmp_path):
    for key, value, message in (("accumulate", 0, "accumulate must be at least 1"),
                                ("lora_rank", -1, "lora_rank must be 0 .off. or a rank")):
        with pytest.raises(ValueError, match=message):
            plan_lib.resolve(tiny_config(tmp_path, "large_similar", **{key: value}))
    with pytest.raises(ValueError, match="lora_rank adapts pretrained weights"):
        plan_lib.resolve(tiny_config(tmp_path, "large_different", init="scratch", lora_rank=4))
