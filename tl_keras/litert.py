"""Edge export: a finished run as a LiteRT (TFLite) model, measured against the Keras model.

    model.keras --TFLiteConverter--> model.tflite, in one of
      none      float32 weights and arithmetic
      float16   float16 weights, float32 arithmetic
      dynamic   int8 weights, activations quantized on the fly
      int8      full integer: int8 weights and activations, calibrated on a few
                hundred images of the run's own training data (seeded, un-augmented)
      int16x8   integer too: int8 weights, int16 activations (TFLite's 16x8
                mode), calibrated as int8; about int8's size, 256 times finer
                activations, slower kernels
    -> checked on the validation split: top-1 agreement with the Keras model
       (`AGREEMENT`) and accuracy lost (`MAX_DROP`); int8 that misses them is
       converted again with its most sensitive layers in float, as long as the
       file stays within `MAX_SIZE` of float32's (`checked_conversion`), and
       what still misses is an error with every measurement and the Keras
       model's own agreement under invisible pixel noise (`noise_agreement`),
       nothing written -- never a model that silently predicts one class
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
import csv
import io
import os
import re
import shutil
import tempfile
import time
import warnings

import numpy as np

from tl_keras import data, evaluate, export, plan as plan_lib, run_folder, tasks
from tl_keras.arrays import as_labels

QUANTIZE = ("none", "float16", "dynamic", "int8", "int16x8")
INTEGER = ("int8", "int16x8")  # calibrated: integer activations
AGREEMENT = 0.95         # least top-1 agreement with the Keras model on the validation images
CALIBRATION = 300        # calibration images (int8)
FLOAT_SHARES = (0.05, 0.1, 0.2, 0.4)  # int8 that misses the bars: these shares of its
                         # layers, the most sensitive first, tried in float until one meets them
MAX_DROP = 0.01          # most validation accuracy lost against the Keras model (1 point)
MAX_SIZE = 0.35          # int8 with float layers: the largest file, as a share of float32's
NOISE = 0.5              # grey levels: the pixel noise of `noise_agreement` (sd)
SENSITIVITY_IMAGES = 100  # calibration images the layers' sensitivity is measured on
LATENCY_IMAGES = 50      # images timed one at a time, one thread


def convert(model, quantize, calibration=None, float_layers=()):
    """The `.tflite` bytes of `model` under `quantize`; `calibration` (uint8 images
    [N, H, W, C]) for int8 and int16x8, `float_layers` (tensor names, `sensitive_layers`) the
    int8 layers kept in float. An op that cannot be converted raises a one-line
    ValueError."""
    import tensorflow as tf

    with _quiet(), _converter(model, quantize, calibration,
                              float_ok=bool(float_layers)) as converter:
        try:
            if not float_layers:
                return converter.convert()
            return tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=_images(calibration[:1]),
                debug_options=tf.lite.experimental.QuantizationDebugOptions(
                    denylisted_nodes=list(float_layers))).get_nondebug_quantized_model()
        except Exception as e:  # ConverterError and friends: name the op when it says one
            message = str(e)
            op = re.search(r"'([\w.]+)' op", message)
            raise ValueError(
                f"cannot convert to LiteRT {quantize}: "
                f"{'op ' + op.group(1) + ' is not supported' if op else _first(message)}"
                f"{' (try --quantize=dynamic)' if quantize in INTEGER else ''}") from None


@contextlib.contextmanager
def _quiet():
    """The converter's INFO logs, its prints on stdout (each saved signature's
    captures) and its Python warnings (tf.lite.Interpreter's deprecation, which
    the quantization debugger runs) kept from the user."""
    with export.quiet_tensorflow_logs(), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _converter(model, quantize, calibration, float_ok=False):
    """A `TFLiteConverter` of `model`'s inference call (training=False) under `quantize`,
    while the SavedModel it converts exists (a temporary folder).

    The SavedModel is written by `export.ServingArchive`, as Keras' `from_keras_model`
    would write it through `keras.export.ExportArchive` (the same function and input
    signature: the same .tflite bytes' outputs) but traced once and every variable
    stored once: a conversion takes about half as long
    (benchmarks/litert_convert_time.py). A model it cannot write goes Keras' way.
    """
    import tensorflow as tf

    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize {quantize!r}; valid: {', '.join(QUANTIZE)}")
    if quantize in INTEGER and (calibration is None or not len(calibration)):
        raise ValueError(f"{quantize} needs calibration images")
    folder = tempfile.mkdtemp(prefix="tl_keras_litert_")
    try:
        try:
            (image,) = model.inputs
            spec = tf.TensorSpec(image.shape, image.dtype, name=image.name)
            export.ServingArchive(model, {"serving_default": (
                lambda images: model(images, training=False), spec)}).write_out(folder)
            converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        except Exception:  # noqa: BLE001  a model the archive cannot write: Keras' way, which
            converter = tf.lite.TFLiteConverter.from_keras_model(model)  # falls back to freezing
        yield _configured(converter, quantize, calibration, float_ok)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _configured(converter, quantize, calibration, float_ok):
    import tensorflow as tf

    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize in INTEGER:
        converter.representative_dataset = _images(calibration)
        integer = (tf.lite.OpsSet.TFLITE_BUILTINS_INT8 if quantize == "int8" else
                   tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8)
        converter.target_spec.supported_ops = [integer] + (
            [tf.lite.OpsSet.TFLITE_BUILTINS] if float_ok else [])
        converter.inference_input_type = tf.float32
        converter.inference_output_type = tf.float32
    return converter


def _images(images):
    """A converter's representative dataset: `images` one at a time, float32."""
    def one_by_one():
        for image in images:
            yield [image[None].astype("float32")]
    return one_by_one


def sensitive_layers(model, calibration, images=SENSITIVITY_IMAGES):
    """The int8 model's quantized layers (tensor names), the most sensitive first.

    A layer's sensitivity is the error of its int8 output against the float
    op's on the same (quantized) input, over `images` calibration images, in
    units of its output's quantization step (RMSE / scale: about 0.29 is
    rounding alone). TensorFlow Lite's `QuantizationDebugger` measures it.
    """
    import tensorflow as tf

    with _quiet(), _converter(model, "int8", calibration) as converter:
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=_images(calibration[:images]))
        debugger.run()
        table = io.StringIO()
        debugger.layer_statistics_dump(table)
    rows = list(csv.DictReader(io.StringIO(table.getvalue())))
    error = {row["tensor_name"]: float(row["mean_squared_error"]) ** 0.5 / float(row["scale"])
             for row in rows if float(row["scale"]) > 0}
    return sorted(error, key=error.get, reverse=True)


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


class Judge:
    """How a converted model is held against the Keras one, by the run's task: the
    decisions they must agree on and the score that must not drop. Single-label: the
    top-1 class, accuracy. Multi-label: each label's decision at its threshold
    (`thresholds`), mAP."""

    def __init__(self, task=tasks.SINGLE_LABEL, thresholds=None):
        self.task, self.multi = task, task.vector_labels
        self.thresholds = None if thresholds is None else np.asarray(thresholds, "float32")
        self.score_key = task.metric  # accuracy | mAP
        self.agreement_key = "decision_agreement" if self.multi else "top1_agreement"
        self.agreement_words = ("agreement of the per-label decisions" if self.multi
                                else "top-1 agreement")

    def agreement(self, a, b):
        """Share of the decisions (images; with multi-label, image-label pairs) that
        probabilities `a` and `b` take alike."""
        if not self.multi:
            return agreement(a, b)
        return float(((a >= self.thresholds) == (b >= self.thresholds)).mean())

    def score(self, probabilities, labels):
        """The task's score (`Task.score`): accuracy, or mAP."""
        return self.task.score(probabilities, labels)


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


class Reference:
    """The Keras model's answers on the validation pipeline `source`, read once:
    labels and probabilities, and its score by `judge` (a `Judge`: the task's). The
    images are read again for each LiteRT model, never held whole (a large
    validation split would not fit in memory)."""

    def __init__(self, model, source, judge=None):
        self.source, self.judge = source, judge or Judge()
        labels, predictions = [], []
        for x, y in source:
            labels.append(as_labels(y))
            predictions.append(np.asarray(model.predict_on_batch(x)))
        self.labels, self.keras = np.concatenate(labels), np.concatenate(predictions)
        self.keras_score = self.judge.score(self.keras, self.labels)

    def __len__(self):
        return len(self.labels)

    def litert(self, tflite, threads=None):
        """The LiteRT model's probabilities on the same images, in the same order."""
        runner = Runner(tflite, threads=threads)
        return np.concatenate([runner(np.asarray(x)) for x, _ in self.source])

    def noise_agreement(self, model, noise=NOISE, seed=0):
        """The Keras model's agreement with itself (`Judge.agreement`) when each
        pixel gets Gaussian noise of `noise` grey levels (sd; half a level is
        below what an 8-bit image can show): how far a bar of agreement can be met
        at all by a model whose arithmetic differs from float32's."""
        rng, noisy = np.random.default_rng(seed), []
        for x, _ in self.source:
            x = np.asarray(x, "float32")
            noisy.append(np.asarray(model.predict_on_batch(
                np.clip(x + rng.normal(0, noise, x.shape), 0, 255).astype("float32"))))
        return self.judge.agreement(self.keras, np.concatenate(noisy))

    def first_images(self, count):
        images = []
        for x, _ in self.source:
            images += list(np.asarray(x)[:count - len(images)])
            if len(images) >= count:
                break
        return np.stack(images)


def measure(tflite, reference, lite):
    """The task's score (accuracy, mAP) of the Keras and the LiteRT model on
    `reference`'s images (`lite`: the LiteRT model's probabilities on them,
    `Reference.litert`), their agreement, and single-thread latency."""
    judge = reference.judge
    return {"images": len(reference),
            f"keras_{judge.score_key}": reference.keras_score,
            f"litert_{judge.score_key}": judge.score(lite, reference.labels),
            judge.agreement_key: judge.agreement(reference.keras, lite),
            "latency_ms_per_image": round(
                latency_ms(tflite, reference.first_images(LATENCY_IMAGES)), 3)}


def checked_conversion(model, quantize, calibration, reference, min_agreement=AGREEMENT,
                       max_drop=MAX_DROP, float_fallback=True, verbose=False,
                       float32_bytes=None, max_size=MAX_SIZE):
    """(tflite bytes, the layers kept in float, its probabilities on the validation
    images) of `convert`, when on the validation images of `reference` (a
    `Reference`) its agreement with the Keras model is at least `min_agreement`
    and its score at most `max_drop` below the Keras model's; else a one-line
    `ValueError` with what was measured, and the Keras model's own agreement
    under half a grey level of pixel noise (`Reference.noise_agreement`).

    An int8 model that misses the bars is converted again with the most
    sensitive of its layers in float (`sensitive_layers`): the shares
    FLOAT_SHARES of them in turn, until one meets them, as long as the file
    stays within `max_size` of `float32_bytes` (the float32 conversion's size):
    a larger one is no longer what int8 promises. Such a model is int8 where
    that holds; its float layers need a float kernel (a CPU or GPU delegate),
    not an integer-only accelerator.
    """
    judge = reference.judge

    def check(tflite, what):
        lite = reference.litert(tflite)
        agreed = judge.agreement(reference.keras, lite)
        drop = reference.keras_score - judge.score(lite, reference.labels)
        tried.append(f"{agreed:.2%} agreement, {100 * drop:.2f} points lost with {what}")
        return agreed >= min_agreement and drop <= max_drop, lite

    tried = []
    tflite, float_layers = convert(model, quantize, calibration), []
    met, lite = check(tflite, "every layer int8" if quantize == "int8" else quantize)
    if not met and quantize == "int8" and float_fallback:
        met, tflite, float_layers, lite = _float_fallback(
            model, calibration, check, tried, float32_bytes or len(convert(model, "none")),
            max_size, verbose)
    if not met:
        others = " or ".join(f"--quantize={q}" for q in ("int16x8", "float16", "dynamic")
                             if q != quantize)
        raise ValueError(f"the {quantize} model misses the bars (at least {min_agreement:.2%} "
                         f"{judge.agreement_words} with the Keras model, at most "
                         f"{100 * max_drop:.2f} points{' of mAP' if judge.multi else ''} lost) on "
                         f"{len(reference)} validation "
                         f"images: {'; '.join(tried)}; the Keras model itself agrees "
                         f"{reference.noise_agreement(model):.2%} with itself under "
                         f"{NOISE:g} grey levels of pixel noise; nothing was written ({others} "
                         "keeps more of the float model; --min_agreement and "
                         "--max_accuracy_drop set the bars)")
    return tflite, float_layers, lite


def _float_fallback(model, calibration, check, tried, float32_bytes, max_size, verbose):
    """`checked_conversion`'s int8 with its most sensitive layers in float, the
    fewest that meet the bars (`check`) within `max_size` of float32's file:
    (met, tflite, float layers, probabilities)."""
    if verbose:
        print(f"int8: {tried[-1].split(' with ')[0]} on the validation images: measuring "
              "each layer's int8 error ...")
    layers = sensitive_layers(model, calibration)
    met = tflite = lite = None
    float_layers = []
    for count in sorted({max(1, round(share * len(layers))) for share in FLOAT_SHARES}):
        candidate = convert(model, "int8", calibration, layers[:count])
        what = f"the {count} most sensitive of {len(layers)} layers in float"
        if len(candidate) > max_size * float32_bytes:
            tried.append(f"{what}: {len(candidate) / float32_bytes:.0%} of float32's size, "
                         f"over {max_size:.0%}")
            if verbose:
                print(f"  {tried[-1]}")
            break
        tflite, float_layers = candidate, layers[:count]
        met, lite = check(tflite, what)
        if verbose:
            print(f"  {tried[-1]}")
        if met:
            break
    return met, tflite, float_layers, lite


def export_run(workdir, export_dir, quantize="int8", calibration_count=CALIBRATION,
               eval_images=0, calibration=None, verbose=True, min_agreement=AGREEMENT,
               max_drop=MAX_DROP, float_fallback=True, max_size=MAX_SIZE):
    """Converts a finished run, checks and measures it, and writes EXPORT_DIR/<n>/.

    Args:
      calibration: uint8 images to calibrate int8 with instead of the run's own
        (tests use it to break calibration on purpose).
      eval_images: validation images to measure on (0: all).
      min_agreement, max_drop: the least top-1 agreement with the Keras model,
        and the most accuracy lost (0.01: 1 point), on the validation images
        measured; a model that misses either is not written.
      float_fallback: an int8 model that misses a bar tries again with its most
        sensitive layers in float (`checked_conversion`); False: refused.
      max_size: the largest such model, as a share of the float32 file.

    Returns:
      (version_dir, the export.json dict).
    """
    for name, bar in (("min_agreement", min_agreement), ("max_accuracy_drop", max_drop),
                      ("max_size", max_size)):
        if not 0 <= bar <= 1:  # before the conversion, not after it
            raise ValueError(f"{name} must be in [0, 1], got {bar}")
    model, config, metrics = evaluate.load_run(workdir)
    class_names = metrics["class_names"]
    thresholds = evaluate.run_thresholds(workdir, metrics)  # multi-label: each label's
    export.check_export_dir(export_dir)
    own, datasets = calibration_images(config, calibration_count)
    calibration = own if calibration is None else np.asarray(calibration)
    source = datasets.val if not eval_images else datasets.val.unbatch().take(
        eval_images).batch(32)
    if verbose:
        print("Reading the validation split and the Keras model's predictions on it ...")
    reference = Reference(model, source, Judge(tasks.of_run(metrics), thresholds))
    if verbose:
        calibrated = (f", calibrated on {len(calibration)} training images"
                      if quantize in INTEGER else "")
        print(f"Converting {workdir}/model.keras to LiteRT ({quantize}{calibrated}) ...")
    tick = time.time()
    float32_bytes = len(convert(model, "none"))
    tflite, float_layers, lite = checked_conversion(
        model, quantize, calibration, reference, min_agreement, max_drop, float_fallback,
        verbose, float32_bytes, max_size)
    seconds = time.time() - tick
    if verbose:
        print("Measuring against the Keras model on the validation split ...")
    measured = measure(tflite, reference, lite)  # the check's predictions: not run twice
    result = {**_described(model, tflite, quantize, calibration, float_layers, measured,
                           float32_bytes),
              "convert_seconds": round(seconds, 1), "run": os.path.abspath(workdir)}
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=export_dir)
    try:
        with open(os.path.join(tmp, "model.tflite"), "wb") as f:
            f.write(tflite)
        export.write_labels(tmp, class_names, thresholds)
        run_folder.write_json(os.path.join(tmp, "export.json"), result)
        version_dir = export.publish(tmp, export_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(format_table(result))
        print(f"Exported version {os.path.basename(version_dir)} to {version_dir}")
    return version_dir, result


def _described(model, tflite, quantize, calibration, float_layers, measured, float32_bytes):
    """export.json's description of the converted model: its size against float32, its
    input and output, how it was calibrated, and what was `measured`."""
    input_type, output_type = Runner(tflite).types()
    score = _score_key(measured)
    return {
        "format": "litert", "quantize": quantize, "file": "model.tflite",
        "bytes": len(tflite), "float32_bytes": float32_bytes,
        "size_vs_float32": round(len(tflite) / float32_bytes, 4),
        "input": {"dtype": input_type, "shape": [1, *model.input.shape[1:]],
                  "values": "raw pixels 0-255, as the Keras model takes"},
        "output": {"dtype": output_type, "values": "class probabilities"},
        "calibration_images": len(calibration) if quantize in INTEGER else 0,
        "float_layers": float_layers,
        **measured,
        f"{score}_difference_points": round(
            100 * (measured[f"litert_{score}"] - measured[f"keras_{score}"]), 2),
    }


def _score_key(measured):
    """The score `measure` recorded: the task's (`Judge.score_key`)."""
    return "mAP" if "keras_mAP" in measured else "accuracy"


def format_table(r):
    score = _score_key(r)
    agreed = ("decision_agreement", "label decisions agree") if score == "mAP" else (
        "top1_agreement", "top-1 agreement")
    rows = [("", "Keras", f"LiteRT {r['quantize']}"),
            (score, f"{r[f'keras_{score}']:.4f}", f"{r[f'litert_{score}']:.4f}"),
            (agreed[1], "", f"{r[agreed[0]]:.4f}"),
            *([("layers in float", "", f"{len(r['float_layers'])} (the most sensitive to int8)")]
              if r["float_layers"] else []),
            ("file", f"{r['float32_bytes'] / 2**20:.2f} MB (float32 .tflite)",
             f"{r['bytes'] / 2**20:.2f} MB ({r['size_vs_float32']:.0%})"),
            ("latency, 1 thread", "", f"{r['latency_ms_per_image']:.2f} ms/image"),
            ("input / output", "", f"{r['input']['dtype']} / {r['output']['dtype']}")]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, width)).rstrip() for row in rows)
