import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import tiny_config
from tl_keras import data


def test_folder_reads_every_format_and_class(image_folder):
    examples = data.from_folder(str(image_folder), val_fraction=0.25, seed=0)
    assert examples.class_names == ["cat", "dog", "fox"]
    assert examples.train_examples + examples.val_examples == 20  # 18 + a BMP + a GIF
    images = list(examples.train.concatenate(examples.val).as_numpy_iterator())
    assert all(image.dtype == np.uint8 and image.shape == (40, 40, 3) for image, _ in images)
    labels = sorted(int(y) for _, y in images)
    assert labels == [0] * 7 + [1] * 7 + [2] * 6
    assert sorted({int(y) for _, y in examples.val.as_numpy_iterator()}) == [0, 1, 2]


def test_bad_files_are_skipped_counted_and_named(image_folder, capsys):
    (image_folder / "cat" / "empty.jpg").write_bytes(b"")
    (image_folder / "dog" / "text.png").write_bytes(b"not an image at all")
    good = (image_folder / "fox" / "0.png").read_bytes()
    (image_folder / "fox" / "truncated.png").write_bytes(good[: len(good) // 3])
    examples = data.from_folder(str(image_folder), seed=0)
    assert sorted(p.split("/")[-1] for p in examples.skipped) == [
        "empty.jpg", "text.png", "truncated.png"]
    assert examples.train_examples + examples.val_examples == 20
    err = capsys.readouterr().err
    assert "Skipped 3 of 23 files" in err and "text.png" in err
    with pytest.raises(ValueError, match=r"cannot decode image '.*empty.jpg'"):
        data.from_folder(str(image_folder), seed=0, strict=True)


def test_folder_errors_before_training(tmp_path, image_folder):
    (image_folder / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class' holds no images"):
        data.from_folder(str(image_folder))
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least 2 classes; found 1"):
        data.from_folder(str(one))
    with pytest.raises(ValueError, match="is not a folder, not tfds:NAME"):
        data.load_examples(tiny_config(tmp_path, dataset=str(tmp_path / "missing")))


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(4), 10)
    train, val = data.split_indices(labels, 0.2, seed=0)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 40
    assert np.bincount(labels[val]).tolist() == [2, 2, 2, 2]
    np.testing.assert_array_equal(val, data.split_indices(labels, 0.2, seed=0)[1])
    assert not np.array_equal(val, data.split_indices(labels, 0.2, seed=1)[1])
    capped, _ = data.split_indices(labels, 0.2, seed=0, max_examples=5)
    assert len(capped) == 5 and set(capped) <= set(train)


def test_pipeline_resizes_batches_and_augments_only_training(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (10, 20, 20)).astype("uint8")
    y = np.arange(10) % 2
    examples = data.from_arrays(x, y, class_names=["a", "b"], val_fraction=0.5, seed=0)
    assert examples.channels == 1
    config = tiny_config(tmp_path, augment=True, augment_flip="horizontal", batch_size=4)
    datasets = data.make_datasets(examples, config, image_size=32)
    val_x, _ = next(iter(datasets.val))
    assert val_x.dtype == tf.uint8 and val_x.shape == (4, 32, 32, 1)
    want = tf.cast(tf.round(tf.image.resize(x[examples_val_indices(y)][:4, ..., None],
                                            (32, 32), antialias=True)), tf.uint8)
    np.testing.assert_array_equal(val_x.numpy(), want.numpy())
    train_x, _ = next(iter(datasets.train))
    assert train_x.dtype == tf.float32 and train_x.shape[1:] == (32, 32, 1)  # augmented
    config.augment = False
    plain_x, _ = next(iter(data.make_datasets(examples, config, image_size=32).train))
    assert plain_x.dtype == tf.uint8


def examples_val_indices(y):
    return data.split_indices(np.asarray(y), 0.5, seed=0)[1]


def test_builtin_digits():
    examples = data.load_examples(tiny_config_plain(dataset="digits"))
    assert examples.train_examples + examples.val_examples == 1797
    assert examples.class_names == [str(i) for i in range(10)]
    image, _ = next(iter(examples.train))
    assert image.shape == (8, 8, 1) and int(tf.reduce_max(image)) <= 255


def tiny_config_plain(**overrides):
    from configs import base
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
