"""LiteRT conversion: the SavedModel written by `export.ServingArchive` against Keras'
`TFLiteConverter.from_keras_model`, side by side.

Run:  python benchmarks/litert_convert_time.py [--repeats=3]
          [--out=benchmarks/results_litert_convert_time.jsonl]

`litert.convert` of the same model under the same settings; only what the converter
reads differs: `from_keras_model` (what tl_keras used before) writes the model's
inference call through Keras' `keras.export.ExportArchive` (each function traced twice,
every variable stored twice) and loads it back; `litert._converter` writes the same
function and input signature with `export.ServingArchive` and converts it with
`from_saved_model`. Alternating, in one process, nothing else running. Each pair's
.tflite files run in the LiteRT interpreter on the same images and must give equal
outputs.

Models (offline): benchmarks/export_time.py's (the smoke config's at 32 px, the
default config's EfficientNet-Lite0 ImageNet at 96 px); quantize none and int8
(calibrated on 16 random images).

One JSON line per conversion to --out: model, quantize, converter, seconds.
"""

import contextlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@contextlib.contextmanager
def from_keras_model(model, quantize, calibration, float_ok=False):
    """`litert._converter` as it was: Keras' converter of the Keras model."""
    import tensorflow as tf

    from tl_keras import litert

    yield litert._configured(tf.lite.TFLiteConverter.from_keras_model(model), quantize,
                             calibration, float_ok)


def main():
    from export_time import MODELS, arguments, classifier

    args = arguments(__doc__, "results_litert_convert_time.jsonl")

    import numpy as np

    from tl_keras import litert

    converters = {"keras_from_keras_model": from_keras_model,
                  "serving_archive": litert._converter}
    with open(args.out, "a") as out:
        for name in MODELS:
            model = classifier(name)
            size = model.input.shape[1]
            images = np.random.default_rng(0).integers(0, 256, (16, size, size, 3), "uint8")
            for quantize in ("none", "int8"):
                for _ in range(args.repeats):
                    outputs = {}
                    for converter, fn in converters.items():
                        litert._converter, real = fn, litert._converter
                        try:
                            began = time.perf_counter()
                            tflite = litert.convert(model, quantize, calibration=images)
                            seconds = time.perf_counter() - began
                        finally:
                            litert._converter = real
                        outputs[converter] = litert.Runner(tflite)(images)
                        row = {"model": name, "quantize": quantize, "converter": converter,
                               "seconds": round(seconds, 2)}
                        print(json.dumps(row), flush=True)
                        out.write(json.dumps(row) + "\n")
                    np.testing.assert_allclose(*outputs.values(), rtol=1e-6, atol=1e-6)
                    converters = dict(reversed(converters.items()))  # the other one first


if __name__ == "__main__":
    main()
