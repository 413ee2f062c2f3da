"""Cached-feature training: same model, same answers, backbone untouched."""

import os

import keras
import numpy as np
import pytest

from conftest import TINY_SIZE, tiny_arrays, tiny_config
from tl_keras import backbones, data, features, plan as plan_lib, train, trainable


def tiny_data(config):
    return data.load(config, image_size=config.image_size)


def built(config, data_):
    plan = plan_lib.resolve(config)
    model, _ = train.build(plan, len(data_.class_names), data_.channels)
    trainable.apply_phase(model, plan.phases[0])
    return model


def val_images(datasets):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in datasets.val])
    return np.concatenate(xs), np.concatenate(ys)


def test_full_model_equals_head_on_cached_features(tmp_path, shared_images):
    config = tiny_config(tmp_path, "small_similar", dataset=str(shared_images), val_fraction=0.4)
    datasets = tiny_data(config)
    model = built(config, datasets)
    backbone_before = [w.numpy().copy() for w in model.get_layer("backbone").weights]
    cache = features.compute(model, datasets, views=1, verbose=0)
    head = features.head_model(model)
    head.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    head_before = model.get_layer("predictions").kernel.numpy().copy()
    head.fit(cache.train_batches(4, seed=0), epochs=2, verbose=0)

    # Training the head model trained the full model's head, and nothing else.
    assert not np.array_equal(head_before, model.get_layer("predictions").kernel.numpy())
    for before, after in zip(backbone_before, model.get_layer("backbone").weights):
        np.testing.assert_array_equal(before, after.numpy())
    x, y = val_images(datasets)
    np.testing.assert_array_equal(cache.val_labels, y)
    np.testing.assert_allclose(model.predict(x, verbose=0), head.predict(cache.val, verbose=0),
                               atol=1e-5)


def test_augmented_views_differ_and_every_epoch_draws_one(tmp_path, shared_images):
    # Cut early: the random tiny backbone's top features are too small to compare.
    config = tiny_config(tmp_path, "small_different", dataset=str(shared_images), augment=True,
                         augment_flip="horizontal", augment_zoom=0.3, augment_rotation=0.2)
    datasets = tiny_data(config)
    assert datasets.augmented
    model = built(config, datasets)
    cache = features.compute(model, datasets, views=3, verbose=0)
    assert cache.views == 3 and all(len(v) == datasets.train_examples for v in cache.train)
    # Each pass reads the images in a new order; without augmentation its rows
    # are the same rows reordered, with augmentation they are new rows.
    # (The folder's two single-colour images look the same under any flip, zoom or rotation.)
    assert sum(matches(row, cache.train[1]) for row in cache.train[0]) <= 2
    config.augment = False
    plain = features.compute(model, tiny_data(config), views=2, verbose=0)
    assert all(matches(row, plain.train[1]) for row in plain.train[0])
    batches = cache.train_batches(5, seed=0)
    seen = set()
    for _ in range(20):
        seen.add(batches.view)
        x, y = batches[0]
        assert x.shape == (5, cache.train[0].shape[1])
        batches.on_epoch_end()
    assert seen == {0, 1, 2}


def matches(row, rows):
    return bool(np.any(np.all(np.isclose(rows, row, rtol=1e-4, atol=0), axis=1)))


def test_features_spill_to_the_run_folder_when_over_the_limit(tmp_path, shared_images):
    config = tiny_config(tmp_path, "small_similar", dataset=str(shared_images))
    datasets = tiny_data(config)
    model = built(config, datasets)
    in_memory = features.compute(model, datasets, views=1, verbose=0)
    spill = tmp_path / "features"
    on_disk = features.compute(model, datasets, views=1, max_bytes=100, spill_dir=str(spill),
                               verbose=0)
    assert in_memory.stored == "memory" and on_disk.stored == str(spill)
    assert sorted(os.listdir(spill)) == ["train_view0.npy", "val.npy"]
    assert isinstance(on_disk.val, np.memmap)
    np.testing.assert_allclose(on_disk.val, in_memory.val, atol=1e-6)


def test_feature_norm_of_features_that_never_vary_is_finite(tmp_path):
    # All-zero features (a float16 underflow, measured with a random backbone)
    # once gave variance 0 and NaN losses as soon as training-mode features moved.
    config = tiny_config(tmp_path)
    model, _ = train.build(plan_lib.resolve(config), 3, 3)
    dim = model.get_layer("feature_norm").input.shape[-1]
    features.adapt_feature_norm(model, np.zeros((8, dim)))
    z = np.asarray(model.get_layer("feature_norm")(np.full((2, dim), 0.5, "float32")))
    np.testing.assert_array_equal(z, 0.5)  # nothing to standardise: identity


@pytest.mark.parametrize("asked, epochs, augmented, want", [
    (3, 2, True, 2),    # 3 views asked, 2 epochs draw from them: 2 views
    (3, 1, True, 1),    # a head phase of 1 epoch (large_similar): 1 view
    (2, 10, True, 2),
    (0, 10, True, 1),   # at least one
    (3, 10, False, 1),  # without augmentation every view is the same
])
def test_no_more_views_than_epochs_that_use_them(asked, epochs, augmented, want):
    assert features.views_to_cache(asked, epochs, augmented) == want


@pytest.mark.graph  # folded where functions are traced, as in a user's run
def test_folded_passes_in_large_batches_equal_keras_predict(tmp_path, shared_images):
    # The default path here (TensorFlow, no GPU): the extractor folded into one
    # constant graph, pipelines rebatched to `inference_batch`. Features must equal
    # Keras' predict at the pipeline's own batches, row for row, labels in step.
    from tl_keras import folded

    assert folded.usable()  # else this test would compare predict with itself
    # Cut early: the random tiny backbone's top features are ~1e-12, too small to compare.
    config = tiny_config(tmp_path, "small_different", dataset=str(shared_images),
                         val_fraction=0.4)
    datasets = tiny_data(config)
    model = built(config, datasets)
    keras_path = features.compute(model, datasets, views=1, verbose=0, folded=False,
                                  inference_batch=0)
    fast = features.compute(model, datasets, views=1, verbose=0, inference_batch=5)
    np.testing.assert_array_equal(fast.val_labels, keras_path.val_labels)
    np.testing.assert_allclose(fast.val, keras_path.val, rtol=1e-5, atol=1e-5)
    # The training pipeline reshuffles on every read: the same rows, labels with them.
    for row, label in zip(fast.train[0], fast.train_labels[0]):
        same_label = keras_path.train[0][keras_path.train_labels[0] == label]
        assert np.isclose(same_label, row, rtol=1e-5, atol=1e-5).all(axis=1).any()
    assert np.abs(keras_path.val).max() > 1e-3  # features, not zeros, were compared

    # Several outputs come back as the model gives them; numpy inputs too.
    extract = features.extractor(model)
    x, y = val_images(datasets)
    two = keras.Model(extract.input, {"pooled": extract.output,
                                      "probabilities": model.output})
    out, labels = folded.predict(two, (x, y), batch_size=3)
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_allclose(out["probabilities"], model.predict(x, verbose=0), atol=1e-5)
    np.testing.assert_allclose(out["pooled"], keras_path.val, rtol=1e-5, atol=1e-5)
    # Keras' path (GPUs, JAX, tf.distribute): from a pipeline, the labels passed
    # through beside the images; a pipeline of images alone has none.
    pipeline = features.rebatch(datasets.val, 4)
    slow, slow_labels = folded.predict(two, pipeline, fold_it=False)
    np.testing.assert_array_equal(slow_labels, y)
    for name in ("pooled", "probabilities"):
        np.testing.assert_allclose(slow[name], out[name], rtol=1e-5, atol=1e-5)
    alone, no_labels = folded.predict(two, pipeline.map(lambda images, _: images), fold_it=False)
    assert no_labels is None
    np.testing.assert_allclose(alone["pooled"], out["pooled"], rtol=1e-5, atol=1e-5)


def test_folding_keeps_squeeze_excite_and_hard_swish():
    # The smoke config's network (most tests') has neither; MobileNetV3-Small's
    # blocks up to its `late` cut have both (six squeeze-excite blocks).
    from tl_keras import folded

    model = backbones.build_backbone("mobilenet_v3_small", weights="none", image_size=TINY_SIZE,
                                     cut="late").model
    assert any(op.activation.__name__ == "hard_silu" for op in model.operations  # hard-swish
               if isinstance(op, keras.layers.Activation))
    # Random weights leave every squeeze-excite gate at ~0.5; spread biases make
    # them matter (one block's biases changed moves the features by ~100%).
    gates = [op for op in model.operations if op.name.endswith("squeeze_excite_conv_1")]
    assert len(gates) == 6
    rng = np.random.default_rng(0)
    for gate in gates:
        kernel, bias = gate.get_weights()
        gate.set_weights([kernel, rng.normal(0, 3, bias.shape).astype("float32")])
    x, y = tiny_arrays(n=6)
    out, labels = folded.predict(folded.fold(model), (x, y), batch_size=4)
    np.testing.assert_array_equal(labels, y)
    expected = model.predict(x, verbose=0)
    scale = np.abs(expected).max()  # ~1e-7: random weights shrink them stage by stage
    assert scale > 0 and np.abs(expected[0] - expected[1]).max() > 0.1 * scale
    np.testing.assert_allclose(out / scale, expected / scale, atol=1e-5)


def test_functions_run_eagerly_pass_through_keras_predict(tmp_path, shared_images, monkeypatch):
    # tf.config.run_functions_eagerly(True) (debugging; this suite's default): every
    # layer's Python runs, so no folded graph; traced functions fold again.
    import tensorflow as tf

    from conftest import traced
    from tl_keras import folded

    fold = folded.fold
    monkeypatch.setattr(folded, "fold", lambda model: pytest.fail("folded while eager"))
    tf.config.run_functions_eagerly(True)
    config = tiny_config(tmp_path, "small_different", dataset=str(shared_images))
    datasets = tiny_data(config)
    model = built(config, datasets)
    cache = features.compute(model, datasets, views=1, verbose=0)
    assert len(cache.val) == datasets.val_examples
    folds = []
    monkeypatch.setattr(folded, "fold", lambda model: folds.append(1) or fold(model))
    with traced():
        again = features.compute(model, datasets, views=1, verbose=0)
    assert folds == [1]
    np.testing.assert_allclose(again.val, cache.val, rtol=1e-5, atol=1e-5)


def test_with_a_gpu_visible_passes_go_through_keras_predict(tmp_path, shared_images,
                                                            monkeypatch):
    # The folded graph is measured faster on CPUs only; on a GPU machine the
    # feature pass must stay Keras' predict (the path GPUs were measured on).
    import tensorflow as tf

    from tl_keras import folded

    visible = tf.config.list_logical_devices
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["/GPU:0"] if kind == "GPU" else visible(kind))
    monkeypatch.setattr(folded, "fold", lambda model: pytest.fail("folded on a GPU machine"))
    assert not folded.usable()
    config = tiny_config(tmp_path, "small_different", dataset=str(shared_images))
    datasets = tiny_data(config)
    cache = features.compute(built(config, datasets), datasets, views=1, verbose=0)
    assert len(cache.val) == datasets.val_examples
