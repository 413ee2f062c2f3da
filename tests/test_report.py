"""A finished run's pictures and report, tools/evaluate.py, tools/predict.py, class weights,
and the report in a real browser."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from conftest import tiny_config, write_image_folder

from tl_keras import data, evaluate, image_files, plan as plan_lib, report, run_folder, train
from tl_keras import trainable

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A small_similar run on a tiny 3-class folder, with its report."""
    root = tmp_path_factory.mktemp("report")
    write_image_folder(root / "images", per_class=10)
    config = tiny_config(root, dataset=str(root / "images"), epochs=3, val_fraction=0.3)
    train.finetune(config, data.load(config, config.image_size))
    return root / "run", root / "images"


def _hashes(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out


def test_a_finished_run_draws_its_curves_regime_and_report(finished_run):
    run, _ = finished_run
    for name in ("curves.png", "regime.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (run / "report.html").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"val_accuracy {metrics['val_accuracy']:.4f}" in page
    assert page.count('src="data:image/png;base64,') == 2  # self-contained: no file links
    assert "Not evaluated yet" in page and "http" not in page.replace(
        "http-equiv", "")  # nothing to fetch


@pytest.mark.parametrize("regime, cut, states", [
    ("small_similar", "top", ["frozen"] * 4),
    ("small_different", "early", ["frozen", "removed", "removed", "removed"]),
    ("small_different", "middle", ["frozen", "frozen", "removed", "removed"]),
    ("large_similar", "top", ["trained"] * 4),
])
def test_regime_picture_states_come_from_the_model(tmp_path, regime, cut, states):
    config = tiny_config(tmp_path, regime, cut=cut)
    plan = plan_lib.resolve(config)
    model, _ = train.build(plan, 3, 3)
    for phase in plan.phases:  # the last phase's freezing, as a finished run has it
        trainable.apply_phase(model, phase)
    drawn = report.stages(model, plan.to_dict())
    assert [state for _, state, _ in drawn[:4]] == states
    assert drawn[-1][1] == "trained" and drawn[-1][0].startswith("new head")
    kept = [params for _, state, params in drawn[:4] if state != "removed"]
    backbone = model.get_layer("backbone")
    assert sum(kept) == sum(int(np.prod(w.shape)) for w in backbone.weights)


def test_curves_mark_the_large_regimes_phase_boundary(tmp_path):
    def boundary(regime, init):  # from the plan's phases, not from the regime's name
        config = tiny_config(tmp_path, regime, init=init, head_epochs=2, epochs=5)
        return report.phase_boundary(plan_lib.resolve(config).phases)

    assert boundary("large_similar", "pretrained") == 2
    assert boundary("large_different", "scratch") is None
    assert boundary("small_similar", "pretrained") is None


def test_calibration_error_and_top_k_by_hand():
    probabilities = np.array([[0.95, 0.05, 0.0], [0.65, 0.35, 0.0], [0.2, 0.25, 0.55],
                              [0.1, 0.85, 0.05]])
    labels = np.array([0, 1, 2, 1])
    ece, bins = evaluate.calibration(probabilities, labels, bins=10)
    # One image per bin: 0.95 right, 0.65 wrong, 0.55 right, 0.85 right.
    assert ece == pytest.approx((0.05 + 0.65 + 0.45 + 0.15) / 4)
    assert sum(b["images"] for b in bins) == 4
    s = evaluate.scores(probabilities, labels, ["a", "b", "c"], top_k=2)
    assert s["accuracy"] == 0.75 and s["top_k_accuracy"] == 1.0
    assert s["per_class"]["b"]["recall"] == 0.5 and s["per_class"]["a"]["precision"] == 0.5
    assert s["most_confused"] == [{"true": "b", "predicted": "a", "count": 1}]
    assert list(evaluate.worst_mistakes(probabilities, labels)) == [1]


@pytest.mark.graph  # folded where functions are traced, as in a user's run
def test_evaluate_tool_matches_the_run_and_changes_nothing_else(finished_run, run_tool,
                                                               monkeypatch):
    from tl_keras import folded

    run, _ = finished_run
    before = {k: v for k, v in _hashes(run).items()
              if not k.startswith("eval") and k != "report.html"}
    folds = []
    fold = folded.fold
    monkeypatch.setattr(folded, "fold", lambda model: folds.append(model) or fold(model))
    result = run_tool("evaluate.py", f"--workdir={run}", "--tta=flip", "--top_k=2")
    assert result.returncode == 0, result.stderr
    assert len(folds) == 1  # one folded graph for the plain and the flipped pass
    ev = json.loads((run / "eval" / "eval.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    # The same final model on the same validation split as training's own measurement.
    assert ev["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    assert ev["images"] == metrics["val_examples"]
    assert sum(r["support"] for r in ev["per_class"].values()) == ev["images"]
    assert np.trace(ev["confusion_matrix"]) == round(ev["accuracy"] * ev["images"])
    assert ev["tta"]["kind"] == "horizontal flip" and 0 <= ev["tta"]["accuracy"] <= 1
    assert all(m["true"] != m["predicted"] for m in ev["mistakes"])
    for name in ("confusion.png", "reliability.png", "mistakes.png"):
        assert (run / "eval" / name).stat().st_size > 0
    page = (run / "report.html").read_text()
    assert "Per class" in page and page.count('src="data:image/png;base64,') == 5
    assert f"accuracy {ev['accuracy']:.4f}" in result.stdout
    after = {k: v for k, v in _hashes(run).items()
             if not k.startswith("eval") and k != "report.html"}
    assert after == before


def test_evaluate_tool_errors_are_one_line(finished_run, run_tool, tmp_path):
    run, _ = finished_run
    cases = [
        ([f"--workdir={tmp_path}"], "holds no finished run"),
        ([f"--workdir={run}", f"--dataset={tmp_path / 'nope'}"], "is not a folder"),
        ([f"--workdir={run}", "--dataset=digits"], "the dataset's classes [0, 1, 2, 3, 4, 5"),
    ]
    for args, message in cases:
        result = run_tool("evaluate.py", *args)
        assert result.returncode == 2, args
        assert message in result.last_line() and "Traceback" not in result.stderr


def test_predict_tool_classifies_files_and_folders_as_csv(finished_run, run_tool, tmp_path):
    run, images = finished_run
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result = run_tool("predict.py", f"--workdir={run}", "--top_k=2", str(images / "cat"),
                      str(images / "dog" / "0.png"), str(tmp_path / "broken.jpg"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "path,class_1,probability_1,class_2,probability_2"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 10 + 1 + 1  # cat's 10 + its BMP, dog's one; the broken file skipped
    assert "Skipped 1 of 13 files that cannot be decoded" in result.stderr
    for row in rows:
        assert float(row[2]) >= float(row[4]) and row[1] in ("cat", "dog", "fox")
    # The same probabilities as the run's model on the images training read.
    model, _, _ = evaluate.load_run(str(run))
    image = image_files.decode(str(images / "dog" / "0.png")).numpy()
    import tensorflow as tf
    size = model.input.shape[1:3]
    resized = np.clip(np.round(tf.image.resize(image, size, antialias=True)), 0, 255)
    expected = model.predict(resized[None].astype("uint8"), verbose=0)[0]
    dog = next(r for r in rows if r[0].endswith(os.path.join("dog", "0.png")))
    assert float(dog[2]) == pytest.approx(float(expected.max()), abs=1e-5)

    strict = run_tool("predict.py", f"--workdir={run}", "--strict", str(tmp_path))
    assert strict.returncode == 2 and "cannot decode image" in strict.last_line()
    out = tmp_path / "p.csv"
    written = run_tool("predict.py", f"--workdir={run}", f"--out={out}", str(images / "fox"))
    assert written.returncode == 0 and out.read_text().count("\n") == 1 + 10
    again = run_tool("predict.py", f"--workdir={run}", f"--out={out}", str(images / "fox"))
    assert again.returncode == 2 and "nothing is overwritten" in again.last_line()


@pytest.mark.slow
def test_predict_tool_reads_a_saved_model_export(finished_run, run_tool, tmp_path):
    run, images = finished_run
    exported = run_tool("export.py", f"--workdir={run}", f"--export_dir={tmp_path / 'ex'}")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "ex" / "1" / "assets.extra" / "labels.txt").read_text() == "cat\ndog\nfox\n"
    from_run = run_tool("predict.py", f"--workdir={run}", str(images / "fox"))
    from_export = run_tool("predict.py", f"--saved_model={tmp_path / 'ex'}", str(images / "fox"))
    assert from_export.returncode == 0, from_export.stderr
    a = [r.split(",") for r in from_run.stdout.splitlines()[1:]]
    b = [r.split(",") for r in from_export.stdout.splitlines()[1:]]
    assert [r[1] for r in a] == [r[1] for r in b]  # same top-1 classes
    np.testing.assert_allclose([float(r[2]) for r in a], [float(r[2]) for r in b], atol=1e-4)


@pytest.mark.slow
def test_balanced_class_weight_raises_the_minority_recall(tmp_path):
    from PIL import Image

    root = tmp_path / "imbalanced"
    rng = np.random.default_rng(0)
    for name, n, shift in (("many", 100, 0), ("few", 10, 30)):  # 10:1
        os.makedirs(root / name)
        for i in range(n):
            pixels = rng.normal(110 + shift, 40, (32, 32, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(root / name / f"{i}.png")
    recall = {}
    for weighting in ("none", "balanced"):
        # MobileNetV3-Small: the smoke config's minimalistic variant with random weights
        # gave the minority class the same recall with and without weights (0.67 both).
        config = tiny_config(tmp_path / weighting, dataset=str(root), class_weight=weighting,
                             epochs=10, val_fraction=0.3, learning_rate=1e-2,
                             backbone="mobilenet_v3_small")
        datasets = data.load(config, config.image_size)
        metrics = train.finetune(config, datasets)
        ev = evaluate.evaluate_run(config.workdir)
        recall[weighting] = ev["per_class"]["few"]["recall"]
        if weighting == "balanced":  # n / (classes x images of the class)
            few, many = datasets.train_label_counts[datasets.class_names.index("few")], \
                datasets.train_label_counts[datasets.class_names.index("many")]
            assert metrics["class_weight"] == {
                "few": pytest.approx((few + many) / 2 / few, abs=1e-4),
                "many": pytest.approx((few + many) / 2 / many, abs=1e-4)}
        else:
            assert metrics["class_weight"] is None
    assert recall["balanced"] > recall["none"] + 0.3, recall


def test_the_report_renders_in_a_real_browser(finished_run, tmp_path):
    """Headless Chromium: the page loads without console errors and every image has a size."""
    if CHROMIUM is None or os.environ.get("TL_KERAS_NO_BROWSER"):
        if os.environ.get("TL_KERAS_REQUIRE_BROWSER"):
            pytest.fail("no Chromium found, and TL_KERAS_REQUIRE_BROWSER is set (CI)")
        pytest.skip("no Chromium: apt-get install chromium (CI installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("TL_KERAS_REQUIRE_BROWSER"):
            raise
        pytest.skip("no playwright: pip install playwright (the [test] extra has it)")
    run, _ = finished_run
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.path.realpath(CHROMIUM),
                                    args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"file://{run / 'report.html'}", wait_until="load")
        sizes = page.eval_on_selector_all(
            "img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert len(sizes) >= 2 and all(done and w > 0 and h > 0 for done, w, h in sizes), sizes
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_history_csv_has_one_reader_for_the_run_and_its_pictures(tmp_path):
    # A resumed run writes an epoch again, and CSVLogger a second header; "NA": not validated.
    (tmp_path / "history.csv").write_text(
        "epoch,accuracy,loss,val_accuracy,val_loss\n"
        "0,0.5,1.0,NA,NA\n"
        "1,0.6,0.9,0.55,0.95\n"
        "epoch,accuracy,loss,val_accuracy,val_loss\n"
        "1,0.65,0.85,0.6,0.9\n"
        "2,0.7,0.8,0.62,0.88\n")
    rows = run_folder.read_history(str(tmp_path))
    assert rows == [{"accuracy": 0.5, "loss": 1.0},
                    {"accuracy": 0.65, "loss": 0.85, "val_accuracy": 0.6, "val_loss": 0.9},
                    {"accuracy": 0.7, "loss": 0.8, "val_accuracy": 0.62, "val_loss": 0.88}]
    assert run_folder.read_history(str(tmp_path), 1, 2) == rows[1:2]
    columns = report.history_columns(str(tmp_path))
    assert columns["epoch"] == [0, 1, 2]
    assert columns["accuracy"] == [0.5, 0.65, 0.7]
    assert np.isnan(columns["val_accuracy"][0]) and columns["val_accuracy"][1:] == [0.6, 0.62]
