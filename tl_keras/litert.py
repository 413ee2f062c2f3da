"""Edge export: a finished run as a LiteRT (TFLite) model, measured against the Keras model.

    model.keras --TFLiteConverter--> model.tflite, in one of
      none      float32 weights and arithmetic
      float16   float16 weights, float32 arithmetic
      dynamic   int8 weights, activations quantized on the fly
      int8      full integer: int8 weights and activations, calibrated on a few
                hundred images of the run's own training data (seeded, un-augmented)
    -> checked: top-1 agreement with the Keras model on the calibration images
       (below `AGREEMENT`: an error, nothing written -- never a model that
       silently predicts one class)
    -> measured on the validation split with the LiteRT interpreter
       (`ai-edge-litert`): accuracy, top-1 agreement with the Keras model, file
       size, single-thread latency per image
    -> EXPORT_DIR/<n>/model.tflite, labels.txt, export.json (versioned, written
       whole, never overwriting; export.py's layout)

Input and output stay float32 in every variant, int8 included: the app feeds the
same raw pixels (0-255, [1, H, W, C] at the model's size) as to the Keras model
and reads probabilities; the int8 model quantizes at its first op and
dequantizes at its last. A uint8 input would save those two ops but tie the
app to the calibration's input scale.

Example:
    version_dir, report = export_run("runs/small_similar_...", "exports/fashion_lite", "int8")
"""

import contextlib
import io
import os
import re
import shutil
import tempfile
import time

import numpy as np

from tl_keras import data, evaluate, export, plan as plan_lib, run_folder

QUANTIZE = ("none", "float16", "dynamic", "int8")
AGREEMENT = 0.9          # least top-1 agreement with the Keras model on the calibration images
CALIBRATION = 300        # calibration images (int8)
LATENCY_IMAGES = 50      # images timed one at a time, one thread


def convert(model, quantize, calibration=None):
    """The `.tflite` bytes of `model` under `quantize`; `calibration` (uint8 images
    [N, H, W, C]) for int8. An op that cannot be converted raises a one-line ValueError."""
    import tensorflow as tf

    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}; valid: {', '.join(QUANTIZE)}")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        if calibration is None or not len(calibration):
            raise ValueError("int8 needs calibration images")

        def representative():
            for image in calibration:
                yield [image[None].astype("float32")]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.float32
        converter.inference_output_type = tf.float32
    try:  # the converter prints each saved signature's captures on stdout
        with export.quiet_tensorflow_logs(), contextlib.redirect_stdout(io.StringIO()):
            return converter.convert()
    except Exception as e:  # ConverterError and friends: name the op when it says one
        message = str(e)
        op = re.search(r"'([\w.]+)' op", message)
        raise ValueError(f"cannot convert to LiteRT {quantize}: "
                         f"{'op ' + op.group(1) + ' is not supported' if op else _first(message)}"
                         f"{' (try --quantize=dynamic)' if quantize == 'int8' else ''}") from None


def _first(text):
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else "(no details)"


class Runner:
    """A LiteRT interpreter (ai-edge-litert) over a `.tflite` model, in batches."""

    def __init__(self, tflite, threads=None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ValueError("measuring a LiteRT model needs the LiteRT interpreter: "
                             "pip install ai-edge-litert (the [litert] extra)") from None
        self.interpreter = Interpreter(model_content=tflite, num_threads=threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = None

    def __call__(self, images):
        """Probabilities [N, C] of uint8 or float images [N, H, W, C] (0-255)."""
        images = np.asarray(images, "float32")
        if self.batch != len(images):
            self.interpreter.resize_tensor_input(self.input["index"], list(images.shape))
            self.interpreter.allocate_tensors()
            self.batch = len(images)
        self.interpreter.set_tensor(self.input["index"], images)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output["index"]))

    def types(self):
        return str(np.dtype(self.input["dtype"])), str(np.dtype(self.output["dtype"]))


def latency_ms(tflite, images):
    """Median milliseconds per image, one thread, one image at a time (after a warm-up)."""
    runner = Runner(tflite, threads=1)
    runner(images[:1])
    times = []
    for image in images:
        start = time.perf_counter()
        runner(image[None])
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def agreement(a, b):
    """Share of images whose top-1 class is the same in probabilities `a` and `b`."""
    return float((np.argmax(a, axis=1) == np.argmax(b, axis=1)).mean())


def calibration_images(config, count=CALIBRATION):
    """The first `count` training images in the source's seeded order, un-augmented
    (data.Datasets.plain_train): the run's own data, the same every time."""
    config = plan_lib.with_defaults(config)  # an older run's config.json lacks newer keys
    datasets = data.load(config, config.image_size)
    images = []
    for x, _ in datasets.plain_train():
        images.append(np.asarray(x))
        if sum(len(i) for i in images) >= count:
            break
    return np.concatenate(images)[:count], datasets


def measure(model, tflite, source, threads=None):
    """Accuracy of the Keras and the LiteRT model on the pipeline `source`, their top-1
    agreement, and single-thread latency."""
    runner = Runner(tflite, threads=threads)
    keras_p, lite_p, labels, timed = [], [], [], []
    for x, y in source:
        x = np.asarray(x)
        keras_p.append(np.asarray(model.predict_on_batch(x)))
        lite_p.append(runner(x))
        labels.append(np.asarray(y).reshape(-1))
        if len(timed) < LATENCY_IMAGES:
            timed += list(x[:LATENCY_IMAGES - len(timed)])
    keras_p, lite_p, labels = map(np.concatenate, (keras_p, lite_p, labels))
    return {"images": int(len(labels)),
            "keras_accuracy": float((keras_p.argmax(1) == labels).mean()),
            "litert_accuracy": float((lite_p.argmax(1) == labels).mean()),
            "top1_agreement": agreement(keras_p, lite_p),
            "latency_ms_per_image": round(latency_ms(tflite, np.stack(timed)), 3)}


def export_run(workdir, export_dir, quantize="int8", calibration_count=CALIBRATION,
               eval_images=0, calibration=None, verbose=True, min_agreement=AGREEMENT):
    """Converts a finished run, checks and measures it, and writes EXPORT_DIR/<n>/.

    Args:
      calibration: uint8 images to calibrate int8 with instead of the run's own
        (tests use it to break calibration on purpose).
      eval_images: validation images to measure on (0: all).
      min_agreement: the least top-1 agreement with the Keras model on the
        calibration images below which nothing is written.

    Returns:
      (version_dir, the export.json dict).
    """
    if not 0 <= min_agreement <= 1:  # before the conversion, not after it
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    model, config, metrics = evaluate.load_run(workdir)
    class_names = metrics["class_names"]
    export.check_export_dir(export_dir)
    own, datasets = calibration_images(config, calibration_count)
    calibration = own if calibration is None else np.asarray(calibration)
    if verbose:
        print(f"Converting {workdir}/model.keras to LiteRT ({quantize}"
              f"{f', calibrated on {len(calibration)} training images' if quantize == 'int8' else ''}) ...")
    tick = time.time()
    tflite = convert(model, quantize, calibration)
    seconds = time.time() - tick
    runner = Runner(tflite)
    agreed = agreement(model.predict(own, verbose=0), runner(own))
    if agreed < min_agreement:
        others = " or ".join(f"--quantize={q}" for q in ("float16", "dynamic") if q != quantize)
        raise ValueError(f"the {quantize} model agrees with the Keras model on only "
                         f"{agreed:.1%} of {len(own)} calibration images (at least "
                         f"{min_agreement:.1%} needed); nothing was written ({others} keeps "
                         f"more of the float model; --min_agreement sets the bar)")
    source = datasets.val if not eval_images else datasets.val.unbatch().take(
        eval_images).batch(32)
    if verbose:
        print("Measuring against the Keras model on the validation split ...")
    measured = measure(model, tflite, source)
    float32_bytes = len(tflite) if quantize == "none" else len(convert(model, "none"))
    input_type, output_type = runner.types()
    result = {
        "format": "litert", "quantize": quantize, "file": "model.tflite",
        "bytes": len(tflite), "float32_bytes": float32_bytes,
        "size_vs_float32": round(len(tflite) / float32_bytes, 4),
        "input": {"dtype": input_type, "shape": [1, *model.input.shape[1:]],
                  "values": "raw pixels 0-255, as the Keras model takes"},
        "output": {"dtype": output_type, "values": "class probabilities"},
        "calibration_images": len(calibration) if quantize == "int8" else 0,
        "calibration_agreement": agreed,
        **measured,
        "accuracy_difference_points": round(
            100 * (measured["litert_accuracy"] - measured["keras_accuracy"]), 2),
        "convert_seconds": round(seconds, 1),
        "run": os.path.abspath(workdir),
    }
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=export_dir)
    try:
        with open(os.path.join(tmp, "model.tflite"), "wb") as f:
            f.write(tflite)
        export.write_labels(tmp, class_names)
        run_folder.write_json(os.path.join(tmp, "export.json"), result)
        version_dir = export.publish(tmp, export_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(format_table(result))
        print(f"Exported version {os.path.basename(version_dir)} to {version_dir}")
    return version_dir, result


def format_table(r):
    rows = [("", "Keras", f"LiteRT {r['quantize']}"),
            ("accuracy", f"{r['keras_accuracy']:.4f}", f"{r['litert_accuracy']:.4f}"),
            ("top-1 agreement", "", f"{r['top1_agreement']:.4f}"),
            ("file", f"{r['float32_bytes'] / 2**20:.2f} MB (float32 .tflite)",
             f"{r['bytes'] / 2**20:.2f} MB ({r['size_vs_float32']:.0%})"),
            ("latency, 1 thread", "", f"{r['latency_ms_per_image']:.2f} ms/image"),
            ("input / output", "", f"{r['input']['dtype']} / {r['output']['dtype']}")]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, width)).rstrip() for row in rows)
