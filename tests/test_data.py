import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import KEEP_AUTOTUNE, tiny_arrays, tiny_config
from tl_keras import arrays, augment as augment_lib, data, image_files


def test_folder_reads_every_format_and_class(shared_images):
    examples = data.from_folder(str(shared_images), val_fraction=0.25, seed=0)
    assert examples.class_names == ["cat", "dog", "fox"]
    assert examples.train_examples + examples.val_examples == 20  # 18 + a BMP + a GIF
    images = list(examples.train.concatenate(examples.val).as_numpy_iterator())
    assert all(image.dtype == np.uint8 and image.shape == (40, 40, 3) for image, _ in images)
    labels = sorted(int(y) for _, y in images)
    assert labels == [0] * 7 + [1] * 7 + [2] * 6
    assert sorted({int(y) for _, y in examples.val.as_numpy_iterator()}) == [0, 1, 2]


def test_bad_files_are_skipped_counted_and_named(image_folder, capfd):
    (image_folder / "cat" / "empty.jpg").write_bytes(b"")
    (image_folder / "dog" / "text.png").write_bytes(b"not an image at all")
    good = (image_folder / "fox" / "0.png").read_bytes()
    (image_folder / "fox" / "truncated.png").write_bytes(good[: len(good) // 3])
    jpeg = (image_folder / "fox" / "1.jpg").read_bytes()
    (image_folder / "fox" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    capfd.readouterr()
    examples = data.from_folder(str(image_folder), seed=0)
    assert sorted(p.split("/")[-1] for p in examples.skipped) == [
        "empty.jpg", "text.png", "truncated.jpg", "truncated.png"]
    assert examples.train_examples + examples.val_examples == 20
    err = capfd.readouterr().err  # file descriptor 2: libjpeg's own lines too
    lines = err.strip().splitlines()
    assert lines[0] == "Skipped 4 of 24 files that cannot be decoded (--strict fails instead):"
    reasons = {os.path.basename(path): reason
               for path, reason in (line.strip().split(": ", 1) for line in lines[1:])}
    assert reasons == {
        "empty.jpg": "Input is empty.",
        "text.png": "Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP "
                    "required.",
        "truncated.jpg": "jpeg::Uncompress failed. Invalid JPEG data or crop window.",
        "truncated.png": reasons["truncated.png"]}
    assert "{{" not in err and "[Op:" not in err and len(lines) == 5  # nothing else printed
    with pytest.raises(ValueError, match=r"cannot decode image '.*empty.jpg': Input is empty\. "):
        data.from_folder(str(image_folder), seed=0, strict=True)


def test_webp_is_read_and_what_is_not_read_is_named(image_folder, capfd):
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 50, "uint8")).save(image_folder / "cat" / "new.webp")
    Image.fromarray(np.full((40, 40, 3), 50, "uint8")).save(image_folder / "cat" / "scan.tiff")
    (image_folder / "dog" / "more").mkdir()
    (image_folder / "dog" / "more" / "0.png").write_bytes((image_folder / "dog" / "0.png")
                                                          .read_bytes())
    capfd.readouterr()
    examples = data.from_folder(str(image_folder), seed=0)
    assert examples.train_examples + examples.val_examples == 21  # 20 + the WebP
    assert capfd.readouterr().err.strip().splitlines() == [
        "Not read: 2 entries of class folders that are not .jpg/.jpeg/.png/.bmp/.gif/.webp "
        "files (nested folders are not read either):",
        f"  {image_folder}/cat/scan.tiff",
        f"  {image_folder}/dog/more/"]


def test_folder_errors_before_training(tmp_path, image_folder):
    (image_folder / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class' holds no images"):
        data.from_folder(str(image_folder))
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least 2 classes; found 1"):
        data.from_folder(str(one))
    with pytest.raises(ValueError, match="is not a folder, not a .csv or .tsv label table, not tfds:NAME"):
        data.load_examples(tiny_config(tmp_path, dataset=str(tmp_path / "missing")))
    (image_folder / "empty_class").rmdir()
    (image_folder / "a\nb").mkdir()  # labels.txt would get a line too many
    with pytest.raises(ValueError, match=r"class folder name 'a\\nb' in .* holds a line break"):
        data.from_folder(str(image_folder))


def test_unreadable_folders_are_one_line_errors(image_folder):
    # Root ignores permissions, so read as nobody, from a folder nobody may enter.
    import shutil
    import tempfile

    def from_folder_as_nobody(root):
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)
        try:
            with pytest.raises(ValueError) as e:
                data.from_folder(root)
        finally:
            if as_root:
                os.seteuid(0)
        return str(e.value)

    shared = tempfile.mkdtemp()
    root = os.path.join(shared, "images")
    try:
        os.chmod(shared, 0o755)
        shutil.copytree(image_folder, root)
        for folder in (root, *(os.path.join(root, c) for c in ("cat", "dog", "fox"))):
            os.chmod(folder, 0o755)
        os.chmod(os.path.join(root, "dog"), 0o000)
        assert from_folder_as_nobody(root) == (
            f"cannot read class folder {os.path.join(root, 'dog')!r}: Permission denied")
        os.chmod(os.path.join(root, "dog"), 0o755)
        os.chmod(root, 0o311)  # may be entered, not listed
        assert from_folder_as_nobody(root) == (
            f"cannot read dataset folder {root!r}: Permission denied")
    finally:
        os.chmod(root, 0o755)
        shutil.rmtree(shared, ignore_errors=True)


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(4), 10)
    train, val = arrays.split_indices(labels, 0.2, seed=0)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 40
    assert np.bincount(labels[val]).tolist() == [2, 2, 2, 2]
    np.testing.assert_array_equal(val, arrays.split_indices(labels, 0.2, seed=0)[1])
    assert not np.array_equal(val, arrays.split_indices(labels, 0.2, seed=1)[1])
    capped, _ = arrays.split_indices(labels, 0.2, seed=0, max_examples=5)
    assert len(capped) == 5 and set(capped) <= set(train)
    # A cap below the number of classes trained on one image of one class, silently.
    with pytest.raises(ValueError, match="max_examples=3 cannot give each of the 4 classes a "
                                         "training image: give at least 4"):
        arrays.split_indices(labels, 0.2, seed=0, max_examples=3)


def test_pipeline_resizes_batches_and_augments_only_training(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (10, 20, 20)).astype("uint8")
    y = np.arange(10) % 2
    examples = data.from_arrays(x, y, class_names=["a", "b"], val_fraction=0.5, seed=0)
    assert examples.channels == 1
    config = tiny_config(tmp_path, augment=True, augment_flip="horizontal", batch_size=4)
    datasets = data.make_datasets(examples, config, image_size=32)
    val_x, _ = next(iter(datasets.val))
    assert val_x.dtype == tf.uint8 and val_x.shape == (4, 32, 32, 1)
    # Enlarged: bilinear, within rounding of the antialiased kernel's result.
    val = x[examples_val_indices(y)][:4, ..., None]
    want = tf.cast(tf.round(tf.image.resize(val, (32, 32))), tf.uint8).numpy()
    np.testing.assert_array_equal(val_x.numpy(), want)
    smooth = tf.round(tf.image.resize(val, (32, 32), antialias=True)).numpy()
    assert np.abs(smooth - want).max() <= 1
    # Shrunk: antialiased (bilinear alone would alias).
    shrunk, _ = next(iter(data.make_datasets(examples, config, image_size=12).val))
    want = tf.cast(tf.round(tf.image.resize(val, (12, 12), antialias=True)), tf.uint8).numpy()
    np.testing.assert_array_equal(shrunk.numpy(), want)
    assert not np.array_equal(want, tf.cast(tf.round(tf.image.resize(val, (12, 12))), tf.uint8))
    train_x, _ = next(iter(datasets.train))
    assert train_x.dtype == tf.float32 and train_x.shape[1:] == (32, 32, 1)  # augmented
    config.augment = False
    plain_x, _ = next(iter(data.make_datasets(examples, config, image_size=32).train))
    assert plain_x.dtype == tf.uint8
    # No tf.data autotuning thread, whose iterator Keras drops every epoch: dropping one
    # can wait out its tuning round (benchmarks/iterator_stall.py).
    for ds in (datasets.train, datasets.val, datasets.plain_train()):
        assert ds.options().autotune.enabled is False


def examples_val_indices(y):
    return arrays.split_indices(np.asarray(y), 0.5, seed=0)[1]


def test_builtin_digits():
    examples = data.load_examples(tiny_config_plain(dataset="digits"))
    assert examples.train_examples + examples.val_examples == 1797
    assert examples.class_names == [str(i) for i in range(10)]
    image, _ = next(iter(examples.train))
    assert image.shape == (8, 8, 1) and int(tf.reduce_max(image)) <= 255


@pytest.mark.skipif(KEEP_AUTOTUNE, reason="TL_KERAS_TEST_AUTOTUNE=1 keeps tf.data autotuning")
def test_the_fast_suite_iterates_without_tf_data_autotuning():
    """conftest's hook, for the pipelines Keras builds itself (arrays, PyDatasets): if a
    TensorFlow release dropped it, this says so rather than the suite slowing silently."""
    ds = tf.data.Dataset.range(4).prefetch(tf.data.AUTOTUNE)
    assert ds.options().autotune.enabled is None  # the dataset itself: as users get it
    assert ds._apply_debug_options().options().autotune.enabled is False  # its iterators


def tiny_config_plain(**overrides):
    from tl_keras.configs import base
    config = base.get_config()
    for key, value in overrides.items():
        config[key] = value
    return config


def test_tfds_through_mock_data(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "network_available", lambda: True)  # mock download is a no-op
    config = tiny_config_plain(dataset="tfds:mnist", tfds_data_dir=str(tmp_path), max_examples=12)
    with tfds.testing.mock_data(num_examples=20):
        examples = data.load_examples(config)
        assert examples.class_names == [str(i) for i in range(10)]
        assert examples.channels == 1
        assert (examples.train_examples, examples.val_examples) == (12, 20)
        datasets = data.make_datasets(examples, config, image_size=32)
        images, labels = next(iter(datasets.val))
    assert images.shape == (20, 32, 32, 1) and labels.dtype == tf.int32


def test_tfds_offline_fails_fast_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "network_available", lambda: False)
    config = tiny_config_plain(dataset="tfds:mnist", tfds_data_dir=str(tmp_path))
    start = time.time()
    with pytest.raises(ValueError, match="is not prepared in .* no network to download it"):
        data.load_examples(config)
    assert time.time() - start < 10
    with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_dataset'"):
        data.load_examples(tiny_config_plain(dataset="tfds:no_such_dataset"))


def test_examples_per_class_caps_each_class_by_seed():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    train, val = arrays.split_indices(labels, 0.2, seed=0, examples_per_class=4)
    assert np.bincount(labels[train]).tolist() == [4, 4, 4]
    assert np.bincount(labels[val]).tolist() == [2, 4, 6]  # validation is never capped
    again, _ = arrays.split_indices(labels, 0.2, seed=0, examples_per_class=4)
    np.testing.assert_array_equal(train, again)
    other, _ = arrays.split_indices(labels, 0.2, seed=1, examples_per_class=4)
    assert not np.array_equal(train, other)
    both, _ = arrays.split_indices(labels, 0.2, seed=0, examples_per_class=4, max_examples=5)
    assert len(both) == 5 and set(both) <= set(train)


def test_builtin_digits_with_examples_per_class():
    examples = data.load_examples(tiny_config_plain(dataset="digits", examples_per_class=20))
    labels = [int(y) for _, y in examples.train.as_numpy_iterator()]
    assert np.bincount(labels).tolist() == [20] * 10
    uncapped = data.load_examples(tiny_config_plain(dataset="digits"))
    assert examples.val_examples == uncapped.val_examples  # validation is never capped


@pytest.mark.skipif(not os.path.isdir(arrays.FASHION_MNIST_DIR),
                    reason=f"{arrays.FASHION_MNIST_DIR} is missing: "
                           "apt-get install dataset-fashion-mnist")
def test_builtin_fashion_mnist_is_the_real_dataset():
    x, y, x_val, y_val, names = arrays.load_builtin("fashion_mnist")
    assert x.shape == (60000, 28, 28) and x_val.shape == (10000, 28, 28)
    assert np.bincount(y).tolist() == [6000] * 10 and np.bincount(y_val).tolist() == [1000] * 10
    assert names[int(y[0])] == "Ankle boot"  # the dataset's first training image
    examples = data.load_examples(tiny_config_plain(dataset="fashion_mnist", max_examples=2000))
    assert (examples.train_examples, examples.val_examples) == (2000, 10000)
    assert examples.channels == 1 and examples.class_names[0] == "T-shirt/top"


def test_fashion_mnist_without_package_or_network_says_what_to_do(monkeypatch, tmp_path):
    def offline():
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(arrays, "FASHION_MNIST_DIR", str(tmp_path / "missing"))
    monkeypatch.setattr(arrays.keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist.*--dataset=digits"):
        data.load_examples(tiny_config_plain(dataset="fashion_mnist"))


def test_tfds_rejects_examples_per_class(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "network_available", lambda: True)
    config = tiny_config_plain(dataset="tfds:mnist", tfds_data_dir=str(tmp_path),
                               examples_per_class=5)
    with tfds.testing.mock_data(num_examples=20):
        with pytest.raises(ValueError, match="examples_per_class is not supported for tfds"):
            data.load_examples(config)


def test_the_first_read_order_does_not_depend_on_the_global_seed(tmp_path, shared_images):
    """A tuner trial builds its pipelines after seeds were set; a fresh finetune.py before:
    both must read the training images in the same order (the winner retrains to its result)."""
    config = tiny_config(tmp_path, dataset=str(shared_images), val_fraction=0.4)
    orders = []
    for global_seed in (None, 5, 123):
        if global_seed is not None:
            tf.random.set_seed(global_seed)
        datasets = data.load(config, 32)
        orders.append(np.concatenate([np.asarray(y) for _, y in datasets.train]))
    assert all((order == orders[0]).all() for order in orders[1:])


def test_augmentation_draws_keras_zoom_and_rotation_from_a_seed():
    import keras

    x = np.random.default_rng(0).uniform(0, 255, (2, 9, 9, 3)).astype("float32")
    ones, zeros = tf.ones([2]), tf.zeros([2])
    np.testing.assert_array_equal(augment_lib.zoom_and_rotate(x, ones, zeros).numpy(), x)
    # Keras' own layers at a fixed draw: a quarter turn, and 20% zoomed out.
    turned = augment_lib.zoom_and_rotate(x, ones, tf.fill([2], np.pi / 2)).numpy()
    keras_turned = keras.layers.RandomRotation((0.25, 0.25), fill_mode="reflect")(x)
    np.testing.assert_allclose(turned, keras.ops.convert_to_numpy(keras_turned), atol=1e-3)
    zoomed = augment_lib.zoom_and_rotate(x, tf.fill([2], 1.2), zeros).numpy()
    keras_zoomed = keras.layers.RandomZoom((0.2, 0.2), fill_mode="reflect")(x)
    np.testing.assert_allclose(zoomed, keras.ops.convert_to_numpy(keras_zoomed), atol=1e-3)
    # A seed alone decides: eagerly and inside tf.data.map, the same images.
    augment = augment_lib.Augmentation("horizontal", 0.1, 0.05)
    seed = tf.constant([3, 4], tf.int64)
    eager = augment(x, seed).numpy()
    mapped = next(iter(tf.data.Dataset.from_tensors(x).map(lambda b: augment(b, seed))))
    np.testing.assert_array_equal(eager, mapped.numpy())
    assert not np.array_equal(eager, augment(x, tf.constant([3, 5], tf.int64)).numpy())


def test_augmented_epochs_are_the_same_in_every_build_and_new_each_epoch(tmp_path):
    def two_epochs(seed):
        config = tiny_config(tmp_path, dataset="digits", max_examples=64, augment=True,
                             seed=seed, batch_size=8)
        train = data.load(config, image_size=32).train
        return [np.concatenate([x.numpy() for x, _ in train]) for _ in range(2)]

    first, again, other = two_epochs(0), two_epochs(0), two_epochs(1)
    for epoch, repeated in zip(first, again):
        np.testing.assert_array_equal(epoch, repeated)  # parallel map, same images
    assert not np.array_equal(first[0], first[1])  # each epoch augmented anew
    assert not np.array_equal(first[0], other[0])  # another seed, other images


def test_rand_augment_is_keras_layer_drawn_from_each_batchs_seed(tmp_path):
    """Keras' RandAugment through the seeded pipeline: the same images in every build
    of the same config (a parallel map, which its own SeedGenerator would not give),
    new ones each epoch, grey images kept grey, RGB ones too."""
    def two_epochs(**overrides):
        config = tiny_config(tmp_path, dataset="digits", max_examples=64, augment=True,
                             batch_size=8, augment_flip="none", augment_zoom=0.0,
                             augment_rotation=0.0, **overrides)
        train = data.load(config, image_size=32).train
        return [np.concatenate([x.numpy() for x, _ in train]) for _ in range(2)]

    first, again = two_epochs(rand_augment=2), two_epochs(rand_augment=2)
    for epoch, repeated in zip(first, again):
        np.testing.assert_array_equal(epoch, repeated)
    assert first[0].shape[-1] == 1 and not np.array_equal(first[0], first[1])
    plain = np.concatenate([x.numpy() for x, _ in data.load(tiny_config(
        tmp_path, dataset="digits", max_examples=64, augment=False, batch_size=8), 32).train])
    changed = np.abs(first[0] - plain).reshape(len(plain), -1).max(axis=1) > 0
    assert changed.mean() > 0.5  # most images changed (an op may leave one as it was)
    rgb = np.random.default_rng(0).uniform(0, 255, (4, 9, 9, 3)).astype("float32")

    def augmentation(**overrides):
        return augment_lib.augmentation(tiny_config(tmp_path, augment=True, augment_flip="none",
                                                    augment_zoom=0.0, augment_rotation=0.0,
                                                    **overrides))
    augment = augmentation(rand_augment=1)
    seed = tf.constant([3, 4], tf.int64)
    out = augment(rgb, seed).numpy()
    assert out.shape == rgb.shape and not np.array_equal(out, rgb)
    np.testing.assert_array_equal(out, augment(rgb, seed).numpy())
    # Another strength, other images (the pipeline above builds the same augmentation).
    assert not np.array_equal(augmentation(rand_augment=1, rand_augment_magnitude=1.0)(
        rgb, seed).numpy(), out)


def test_a_folder_is_checked_once_and_a_changed_file_again(image_folder, monkeypatch, capfd):
    decoded = []
    check = image_files._check_file
    monkeypatch.setattr(image_files, "_check_file", lambda path: decoded.append(path) or check(path))
    first = data.from_folder(str(image_folder), val_fraction=0.25, seed=0)
    assert len(decoded) == 20  # every file, once
    decoded.clear()
    again = data.from_folder(str(image_folder), val_fraction=0.25, seed=0)
    assert decoded == []  # unchanged: nothing decoded to check it
    assert (again.train_examples, again.val_examples) == (first.train_examples,
                                                          first.val_examples)
    # A file that changes is decoded again, and a file that turned bad is skipped as before.
    good = image_folder / "fox" / "0.png"
    good.write_bytes(good.read_bytes()[:40])
    capfd.readouterr()
    changed = data.from_folder(str(image_folder), val_fraction=0.25, seed=0)
    assert decoded == [str(good)]
    assert changed.skipped == [str(good)]
    assert f"{good}: " in capfd.readouterr().err
    decoded.clear()
    data.from_folder(str(image_folder), val_fraction=0.25, seed=0)
    assert decoded == []  # the bad verdict is kept too
    assert not any(name.startswith(".") or name.endswith(".json")
                   for _, _, files in os.walk(image_folder) for name in files)  # nothing written there


def _mixed(kind, seed=(0, 1), in_dataset=False):
    """A batch of 8 images, each one value per class (class k: 40 k), mixed."""
    import tensorflow as tf

    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3], "int32")
    images = np.broadcast_to((40.0 * labels)[:, None, None, None], (8, 16, 16, 3)).copy()
    mix = augment_lib.Mix(kind, alpha=1.0, num_classes=4)
    seed = tf.constant(seed, tf.int64)
    if not in_dataset:
        x, y = mix(images, labels, seed)
        return images, x.numpy(), y.numpy()
    ds = tf.data.Dataset.from_tensors((images, labels)).map(lambda a, b: mix(a, b, seed))
    x, y = next(iter(ds))
    return images, x.numpy(), y.numpy()


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_labels_hold_each_image_s_share_of_every_class(kind):
    _, x, y = _mixed(kind)
    np.testing.assert_allclose(y.sum(axis=1), 1, rtol=1e-6)
    # Each image is made of the classes' values in the shares its label says.
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), y @ (40.0 * np.arange(4)), rtol=1e-4,
                               atol=1e-3)
    assert np.any((y > 0.01) & (y < 0.99))  # mixed, not one image copied
    if kind == "cutmix":  # pasted, not blended: every pixel is one class's value
        assert set(np.unique(x)) <= {0.0, 40.0, 80.0, 120.0}


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_a_mix_is_the_same_eagerly_and_in_tf_data_and_differs_by_seed(kind):
    _, eager, labels = _mixed(kind)
    _, mapped, mapped_labels = _mixed(kind, in_dataset=True)
    np.testing.assert_allclose(mapped, eager, rtol=1e-6)
    np.testing.assert_allclose(mapped_labels, labels, rtol=1e-6)
    assert not np.allclose(_mixed(kind, seed=(0, 2))[2], labels)


def test_mixed_batches_are_the_same_each_build_and_new_each_epoch():
    import tensorflow as tf

    x, y = tiny_arrays(16)
    mix = augment_lib.Mix("mixup", 0.4, 3)

    def epochs(seed):
        ds = augment_lib.mix_batches(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), mix, seed)
        return [np.concatenate([b.numpy() for _, b in ds]) for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.allclose(first[0], first[1])
    assert not np.allclose(first[0], other[0])
