"""SavedModel export: tl_keras's `ServingArchive` against Keras' `ExportArchive`, side by side.

Run:  python benchmarks/export_time.py [--repeats=3] [--out=benchmarks/results_export_time.jsonl]

Both write the same two endpoints (`export.serving_archive`'s serving_default and
serve_bytes) of the same model through `export.export`; only the archive differs:
Keras' `keras.export.ExportArchive` (what tl_keras used before) traces each endpoint
twice and walks every layer for lookup tables, `export.ServingArchive` hands the
endpoints to `tf.saved_model.save` once. Alternating, in one process, nothing else
running. Each pair's exports are loaded again and must give equal outputs.

Models (offline): the smoke config's (mobilenet_v3_small_minimalistic, random
weights, 32 px, cut at `late`) and the default config's (EfficientNet-Lite0's
ImageNet weights, 96 px, cut at `top`).

One JSON line per export to --out: model, archive, seconds.
"""

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {  # name: (backbone, weights, image size, cut)
    "smoke": ("mobilenet_v3_small_minimalistic", "none", 32, "late"),
    "lite0": ("efficientnet_lite0", "imagenet", 96, "top"),
}


class KerasArchive:
    """The endpoints through Keras' ExportArchive, as `export.serving_archive` made them."""

    def __init__(self, model, endpoints):
        import keras

        self.archive = keras.export.ExportArchive()
        self.archive.track(model)
        for name, (fn, spec) in endpoints.items():
            self.archive.add_endpoint(name, fn, input_signature=[spec])

    def write_out(self, path, verbose=False):
        self.archive.write_out(path, verbose=verbose)


def classifier(name):
    from tl_keras import backbones, model as model_lib

    backbone, weights, size, cut = MODELS[name]
    built = backbones.build_backbone(backbone, weights=weights, image_size=size, cut=cut)
    return model_lib.build_classifier(built.model, backbone, num_classes=3)


def arguments(doc, results, repeats=3, **more):
    """--repeats and --out (default benchmarks/`results`) of a benchmark described by `doc`,
    and a flag for each of `more` (name=default; its type the default's)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", results))
    for name, default in more.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    return parser.parse_args()


def main():
    args = arguments(__doc__, "results_export_time.jsonl")

    import numpy as np
    import tensorflow as tf

    from tl_keras import export

    archives = {"keras_export_archive": KerasArchive, "serving_archive": export.ServingArchive}
    with open(args.out, "a") as out:
        for name in MODELS:
            model = classifier(name)
            size = model.input.shape[1]
            images = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)),
                                 tf.float32)
            for _ in range(args.repeats):
                outputs = {}
                for archive, cls in archives.items():
                    export.ServingArchive, real = cls, export.ServingArchive
                    try:
                        began = time.perf_counter()
                        version = export.export(model, ["a", "b", "c"], tempfile.mkdtemp(),
                                                verbose=False)
                        seconds = time.perf_counter() - began
                    finally:
                        export.ServingArchive = real
                    loaded = tf.saved_model.load(version)
                    outputs[archive] = loaded.signatures["serving_default"](images=images)[
                        "probabilities"].numpy()
                    row = {"model": name, "archive": archive, "seconds": round(seconds, 2)}
                    print(json.dumps(row), flush=True)
                    out.write(json.dumps(row) + "\n")
                np.testing.assert_allclose(*outputs.values(), rtol=1e-6, atol=1e-6)
            archives = dict(reversed(archives.items()))  # the other one first next model


if __name__ == "__main__":
    main()
