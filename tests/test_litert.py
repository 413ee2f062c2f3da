"""LiteRT export: outputs equal the Keras model's, int8 is calibrated on the run's own data
and measured, a broken calibration is refused, versions are never overwritten."""

import json
import os
import tempfile

import numpy as np
import pytest
from conftest import ROOT, tiny_config, traced, write_image_folder

from tl_keras import data, evaluate, export, litert, train

pytest.importorskip("ai_edge_litert", reason="pip install ai-edge-litert (the [test] extra)")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """seed_cnn (ReLU convolutions and Dense layers: what int8 handles well), pretrained by
    the study, a head trained on a tiny 3-class folder."""
    root = tmp_path_factory.mktemp("litert")
    write_image_folder(root / "images", per_class=12)
    weights = os.path.join(ROOT, "benchmarks", "study", "seed_cnn_fashion0-4.weights.h5")
    config = tiny_config(root, dataset=str(root / "images"), epochs=30, val_fraction=0.3,
                         learning_rate=1e-2, backbone="seed_cnn", image_size=28,
                         weights=weights)
    with traced():  # 30 epochs: tracing each step once is cheaper than running them eagerly
        train.finetune(config, data.load(config, config.image_size))
    return root / "run"


def test_float32_litert_gives_the_keras_models_outputs(finished_run, tmp_path, monkeypatch):
    model, config, _ = evaluate.load_run(str(finished_run))
    images, _ = litert.calibration_images(config, 20)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tflite = litert.convert(model, "none")  # the inference call: dropout off, as in predict
    np.testing.assert_allclose(litert.Runner(tflite)(images), model.predict(images, verbose=0),
                               atol=1e-5)
    converted = [name for name in os.listdir(tmp_path) if name.startswith("tl_keras_litert_")]
    assert converted == []  # the SavedModel it converted is gone
    # A model the archive cannot write is converted Keras' way: the same outputs.
    monkeypatch.setattr(export.ServingArchive, "write_out", lambda *a: 1 / 0)
    np.testing.assert_allclose(litert.Runner(litert.convert(model, "none"))(images),
                               model.predict(images, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="^unknown quantize 'int4'; valid: none, float16, "):
        litert.convert(model, "int4")


@pytest.mark.slow
def test_int8_export_is_calibrated_measured_and_versioned(finished_run, run_tool, tmp_path):
    out = tmp_path / "lite"
    # On 24 calibration images this tiny model meets the bars only with 6 of its 14 layers
    # in float, a file of 76% of float32's: allowed here (the size bar has its own test).
    result = run_tool("export.py", f"--workdir={finished_run}", f"--export_dir={out}",
                      "--format=litert", "--quantize=int8", "--calibration_images=24",
                      "--max_int8_size=1")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "1" / "export.json").read_text())
    assert (out / "1" / "labels.txt").read_text() == "cat\ndog\nfox\n"
    assert (out / "1" / "model.tflite").stat().st_size == report["bytes"]
    assert report["quantize"] == "int8" and report["calibration_images"] == 24
    assert report["bytes"] < report["float32_bytes"]
    assert report["top1_agreement"] >= litert.AGREEMENT
    assert report["keras_accuracy"] - report["litert_accuracy"] <= litert.MAX_DROP
    assert (report["input"]["dtype"], report["output"]["dtype"]) == ("float32", "float32")
    metrics = json.loads((finished_run / "metrics.json").read_text())
    # The Keras model measured beside it is the run's: its validation accuracy.
    assert report["keras_accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    assert report["images"] == metrics["val_examples"]
    assert "LiteRT int8" in result.stdout and "top-1 agreement" in result.stdout
    # A second export is version 2; version 1 is untouched.
    first = (out / "1" / "model.tflite").read_bytes()
    again = run_tool("export.py", f"--workdir={finished_run}", f"--export_dir={out}",
                     "--format=litert", "--quantize=float16")
    assert again.returncode == 0, again.stderr
    assert (out / "1" / "model.tflite").read_bytes() == first
    assert json.loads((out / "2" / "export.json").read_text())["quantize"] == "float16"


def test_a_broken_calibration_is_refused_and_nothing_is_written(finished_run, tmp_path):
    model, config, _ = evaluate.load_run(str(finished_run))
    images, _ = litert.calibration_images(config, 24)
    broken = np.zeros_like(images)  # every calibration image black: activations' ranges collapse
    out = tmp_path / "lite"
    with pytest.raises(ValueError, match=r"^the int8 model misses the bars \(at least 95.00% top-1 "
                                         r"agreement with the Keras model, at most 1.00 points "
                                         r"lost\) on 12 validation images: [\d.]+% agreement, "
                                         r"-?[\d.]+ points lost with every layer int8; the Keras "
                                         r"model itself agrees [\d.]+% with itself under 0.5 grey "
                                         r"levels of pixel noise; nothing was written "
                                         r"\(--quantize=int16x8 or --quantize=float16 or "
                                         r"--quantize=dynamic"):
        litert.export_run(str(finished_run), str(out), "int8", calibration_count=24,
                          calibration=broken, verbose=False, float_fallback=False)
    assert [p.name for p in out.iterdir()] == []
    # The bars are the user's: at 0 agreement and any loss the same model is written.
    version, report = litert.export_run(str(finished_run), str(out), "int8",
                                        calibration_count=24, calibration=broken,
                                        verbose=False, min_agreement=0.0, max_drop=1.0)
    assert os.path.basename(version) == "1" and report["top1_agreement"] < 0.95
    assert report["float_layers"] == []


def test_int8_below_the_bar_keeps_its_most_sensitive_layers_in_float(finished_run, tmp_path):
    """Calibrated on 2 images, full int8 agrees with the Keras model on 11 of 12
    validation images (measured); with the fallback, the layers whose int8 output
    strays most from float's are kept in float, the fewest that meet the bars."""
    model, config, _ = evaluate.load_run(str(finished_run))
    images, datasets = litert.calibration_images(config, 2)
    layers = litert.sensitive_layers(model, images)
    assert len(layers) == 14 and len(set(layers)) == len(layers)
    with pytest.raises(ValueError, match=r"on 12 validation images: 91.67% agreement, 8.33 points "
                                         r"lost with every layer int8; the Keras model itself "
                                         r"agrees 100.00% with itself under 0.5 grey levels"):
        litert.export_run(str(finished_run), str(tmp_path / "lite"), "int8",
                          calibration=images, verbose=False, float_fallback=False)
    version, report = litert.export_run(str(finished_run), str(tmp_path / "lite"), "int8",
                                        calibration=images, verbose=False)
    kept = report["float_layers"]
    assert 0 < len(kept) < len(layers) and kept == layers[:len(kept)]  # the most sensitive
    assert report["top1_agreement"] >= litert.AGREEMENT
    assert report["keras_accuracy"] - report["litert_accuracy"] <= litert.MAX_DROP
    # What was written is what was measured: the file reproduces the reported agreement.
    tflite = (tmp_path / "lite" / "1" / "model.tflite").read_bytes()
    reference = litert.Reference(model, datasets.val)
    assert litert.agreement(reference.keras, reference.litert(tflite)) == report["top1_agreement"]


def test_int8_grown_past_its_size_bar_by_float_layers_is_refused(finished_run, tmp_path):
    """The fallback's float layers make the file larger; past `max_size` of the float32
    file the model is no longer int8's promise: refused, with its size, nothing written."""
    model, config, _ = evaluate.load_run(str(finished_run))
    images, _ = litert.calibration_images(config, 2)
    out = tmp_path / "lite"
    with pytest.raises(ValueError, match=r"with every layer int8; the 1 most sensitive of 14 "
                                         r"layers in float: 29% of float32's size, over 25%; the "
                                         r"Keras model itself agrees"):
        litert.export_run(str(finished_run), str(out), "int8", calibration=images,
                          verbose=False, max_size=0.25)
    assert list(out.iterdir()) == []


def test_int16x8_keeps_int8_weights_and_meets_the_bar_int8_misses(finished_run, tmp_path):
    """Calibrated on the same 2 images that leave full int8 at 91.67% agreement, int8
    weights with int16 activations agree on every validation image, at about int8's size."""
    model, config, _ = evaluate.load_run(str(finished_run))
    images, _ = litert.calibration_images(config, 2)
    version, report = litert.export_run(str(finished_run), str(tmp_path / "lite"), "int16x8",
                                        calibration=images, verbose=False,
                                        float_fallback=False)
    assert report["quantize"] == "int16x8" and report["calibration_images"] == 2
    assert report["top1_agreement"] == 1.0 and report["float_layers"] == []
    assert report["size_vs_float32"] < litert.MAX_SIZE
    from ai_edge_litert.interpreter import Interpreter
    tensors = Interpreter(model_content=(tmp_path / "lite" / "1" / "model.tflite").read_bytes()
                          ).get_tensor_details()
    kinds = {str(np.dtype(t["dtype"])) for t in tensors}
    assert {"int8", "int16"} <= kinds  # weights int8, activations int16


def test_the_agreement_bar_is_the_user_s(finished_run, run_tool, tmp_path):
    result = run_tool("export.py", f"--workdir={finished_run}", f"--export_dir={tmp_path}",
                      "--format=litert", "--min_agreement=1.5")
    assert result.returncode == 2
    assert result.last_line() == "export.py: error: --min_agreement must be in [0, 1], got 1.5"
    result = run_tool("export.py", f"--workdir={finished_run}", f"--export_dir={tmp_path}",
                      "--format=litert", "--max_accuracy_drop=-0.1")
    assert result.last_line() == ("export.py: error: --max_accuracy_drop must be in [0, 1], "
                                  "got -0.1")
    assert list(tmp_path.iterdir()) == []


def test_unknown_quantization_is_one_line(finished_run, run_tool, tmp_path):
    result = run_tool("export.py", f"--workdir={finished_run}", f"--export_dir={tmp_path}",
                      "--format=litert", "--quantize=int4")
    assert result.returncode != 0 and "int4" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_finetune_exports_litert_after_training(run_tool, tmp_path):
    images = tmp_path / "images"
    write_image_folder(images, per_class=12)
    weights = os.path.join(ROOT, "benchmarks", "study", "seed_cnn_fashion0-4.weights.h5")
    result = run_tool("finetune.py", "--regime=small_similar", "--backbone=seed_cnn",
                      "--image_size=28", f"--weights={weights}", f"--dataset={images}",
                      "--epochs=2", "--config.verbose=0", f"--workdir={tmp_path / 'run'}",
                      f"--export_dir={tmp_path / 'lite'}", "--export_format=litert",
                      "--export_quantize=float16")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "lite" / "1" / "export.json").read_text())
    assert report["quantize"] == "float16" and report["top1_agreement"] >= 0.9
