"""Labels from a table (tl_keras/tables.py, data.from_table): a CSV or TSV file, or a
DataFrame, of image paths and labels, read as a folder is read."""

import json
import os
import random

import numpy as np
import pytest

from conftest import ROOT
from tl_keras import api, data, tables


def listed(folder, shuffle_seed=0):
    """(path relative to `folder`, class) of every image in its class folders, shuffled."""
    rows = [(f"{name}/{f}", name) for name in sorted(os.listdir(folder))
            if os.path.isdir(folder / name) for f in sorted(os.listdir(folder / name))]
    random.Random(shuffle_seed).shuffle(rows)
    return rows


def write_table(path, rows, header=("image", "label"), delimiter=","):
    path.write_text("\n".join(delimiter.join(row) for row in [header, *rows]) + "\n")
    return path


def pixels_and_labels(dataset):
    images, labels = zip(*dataset.as_numpy_iterator())
    return np.stack(images), np.array(labels)


def assert_same_examples(a, b):
    assert a.class_names == b.class_names
    assert (a.train_examples, a.val_examples) == (b.train_examples, b.val_examples)
    np.testing.assert_array_equal(a.train_label_counts, b.train_label_counts)
    for split in ("train", "val"):
        for x, y in zip(pixels_and_labels(getattr(a, split)),
                        pixels_and_labels(getattr(b, split))):
            np.testing.assert_array_equal(x, y)


def test_a_table_of_a_folders_files_gives_the_folders_examples(image_folder):
    # Rows in any order, "./" or not, CSV or TSV or a DataFrame: the same split by seed,
    # the same images in the same order, the same labels as the class folders give.
    rows = [("./" + p if i % 2 else p, c) for i, (p, c) in enumerate(listed(image_folder))]
    folder = data.from_folder(str(image_folder), seed=3)
    for path in (write_table(image_folder / "labels.csv", rows),
                 write_table(image_folder / "labels.tsv", rows[::-1], delimiter="\t")):
        assert_same_examples(
            data.from_table(tables.read_file(str(path), tables.settings()), seed=3), folder)
    pandas = pytest.importorskip("pandas")
    df = pandas.DataFrame({"file": [str(image_folder / p) for p, _ in rows],
                           "class": [c for _, c in rows]})
    assert_same_examples(data.from_dataframe(df, seed=3), folder)


def test_the_split_column_decides_validation_and_caps_apply_to_training(image_folder):
    rows = listed(image_folder)
    valid = {p for p, c in rows if p.split("/")[1].startswith(("0.", "1."))}
    table = write_table(image_folder / "labels.csv",
                        [(p, c, "valid" if p in valid else "train") for p, c in rows],
                        header=("path", "label", "split"))
    examples = data.from_table(tables.read_file(str(table), tables.settings()),
                               examples_per_class=3)
    assert examples.val_examples == len(valid) == 6  # never capped, never drawn by seed
    assert examples.train_examples == 9  # 3 of each class's training rows
    val_pixels = pixels_and_labels(examples.val)[0]
    wanted = [data.decode(str(image_folder / p)).numpy() for p in sorted(
        valid, key=lambda p: (p.split("/")[0], str(image_folder / p)))]
    np.testing.assert_array_equal(val_pixels, np.stack(wanted))


def test_missing_and_undecodable_files_are_skipped_counted_and_named(image_folder, capfd):
    rows = listed(image_folder) + [("cat/gone.jpg", "cat"), ("dog/empty.png", "dog")]
    (image_folder / "dog" / "empty.png").write_bytes(b"")
    table = str(write_table(image_folder / "labels.csv", rows))
    capfd.readouterr()
    examples = data.from_table(tables.read_file(table, tables.settings()))
    assert sorted(os.path.basename(p) for p in examples.skipped) == ["empty.png", "gone.jpg"]
    assert examples.train_examples + examples.val_examples == 20
    err = capfd.readouterr().err.strip().splitlines()
    assert err[0] == "Skipped 2 of 22 files that cannot be decoded (--strict fails instead):"
    assert any("gone.jpg: " in line and "No such file" in line for line in err[1:]), err
    with pytest.raises(ValueError, match=r"cannot decode image '.*gone.jpg'"):
        data.from_table(tables.read_file(table, tables.settings()), strict=True)


@pytest.mark.parametrize("text, settings, message", [
    ("image,label\n../cat/0.png,cat\ndog/0.png,dog\n", {},
     "image path '../cat/0.png' leaves the table's folder '{root}'; give it from inside "
     "the folder, or absolute"),
    ("image,label\ncat/0.png,cat\ndog/0.png,\ndog/1.jpg,\n", {},
     "an empty 'label' cell at line 3 (2 in all)"),
    ("image,label\ncat/0.png,cat\n\ndog/0.png,dog person\n", {},
     "several labels separated by ' ' in a cell ('dog person' at line 4; 1 in all); several "
     "labels per image need --config.task=multi_label; if each cell is one label, set "
     "table.label_delimiter=none"),
    ("image,label\ncat/0.png,cat|fox\n", {},
     "several labels separated by '|' in a cell ('cat|fox' at line 2; 1 in all); several "
     "labels per image need --config.task=multi_label; if each cell is one label, set "
     "table.label_delimiter=none"),
    ("image,label\ncat/0.png,cat\n", {"label_column": "class"},
     "no column 'class' (table.label_column); its columns: image, label"),
    ("image\ncat/0.png\n", {}, "needs a path column and a label column; found the columns "
     "['image']"),
    ("image,label,split\ncat/0.png,cat,train\ndog/0.png,dog,valid\n", {},
     "labels seen only in validation rows, never in training: 'dog'"),
    ("image,label,split\ncat/0.png,cat,test\n", {},
     "split column 'split' holds 'test' at line 2; valid: train, valid (val, validation)"),
    ("image,label\ncat/0.png,cat\n./cat/0.png,dog\n", {},
     "image '{root}/cat/0.png' is listed twice (line 2 and line 3); list each image once"),
    ("image,label\ncat/0.png\n", {}, "line 2 has fewer cells than the header's 2 (1 in all)"),
    ("image,label\n", {}, "needs a header row and at least one row of an image and its "
     "label; it has 1 row"),
])
def test_a_bad_table_is_one_line_before_any_image_is_read(image_folder, text, settings,
                                                          message, monkeypatch):
    monkeypatch.setattr(data, "check_images", lambda *a, **k: pytest.fail("images read"))
    (image_folder / "labels.csv").write_text(text)
    with pytest.raises(ValueError) as e:
        tables.read_file(str(image_folder / "labels.csv"), tables.settings(**settings))
    assert str(e.value) == (f"label table '{image_folder}/labels.csv': "
                            + message.format(root=image_folder))


def test_one_label_per_cell_when_the_delimiter_is_none(image_folder):
    rows = [(p, "big " + c) for p, c in listed(image_folder)]
    table = write_table(image_folder / "labels.csv", rows)
    examples = data.from_table(tables.read_file(str(table),
                                                tables.settings(label_delimiter="none")))
    assert examples.class_names == ["big cat", "big dog", "big fox"]


@pytest.mark.slow  # two whole runs of the tool (docs/testing.md)
def test_the_tool_trains_on_a_table_as_on_its_folder(shared_images, tmp_path, run_tool):
    # The same files as class folders and as a CSV: the same metrics.json numbers.
    table = write_table(tmp_path / "labels.csv",
                        [(str(shared_images / p), c) for p, c in listed(shared_images)])
    metrics = {}
    for name, dataset in (("folder", shared_images), ("table", table)):
        result = run_tool("finetune.py", "--regime=small_similar",
                          f"--config={ROOT}/configs/smoke.py", f"--dataset={dataset}",
                          "--epochs=2", "--config.verbose=0", f"--workdir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-2000:]
        metrics[name] = json.load(open(tmp_path / name / "metrics.json"))
    measured = ("val_accuracy", "val_loss", "best_val_accuracy", "train_examples",
                "val_examples", "class_names")
    assert {k: metrics["table"][k] for k in measured} == {
        k: metrics["folder"][k] for k in measured}
    assert json.load(open(tmp_path / "table" / "config.json"))["dataset"] == str(table)


def test_a_dataframe_from_python_is_saved_once_as_the_csv_its_run_names(shared_images,
                                                                        monkeypatch):
    pandas = pytest.importorskip("pandas")
    monkeypatch.chdir(shared_images)
    rows = listed(shared_images)
    df = pandas.DataFrame({"image": [p for p, _ in rows], "label": [c for _, c in rows]})
    config, _ = api.make_config("small_similar", dataset=df)
    saved = config.dataset
    assert saved.endswith(".csv") and os.path.isfile(saved)
    table = tables.read_file(saved, config.table)  # absolute paths: the working folder's files
    assert table.paths == [str(shared_images / p) for p, _ in rows]
    assert table.labels == [(c,) for _, c in rows]
    again, _ = api.make_config("small_similar", dataset=df.copy())
    assert again.dataset == saved  # the same rows, the same file: a run resumes
    df.loc[0, "label"] = "dog" if rows[0][1] != "dog" else "cat"
    assert api.make_config("small_similar", dataset=df)[0].dataset != saved
