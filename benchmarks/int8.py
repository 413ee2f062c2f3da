"""Does int8 hold on every dataset tl_keras is measured on? LiteRT int8 with its bars.

Run:  python benchmarks/int8.py [--work=/tmp/int8] [--out=benchmarks/results_int8.jsonl]
      python benchmarks/int8.py --table      # print the recorded results

Trains one run per dataset (or reuses a finished one under --work), then exports it as
`tools/export.py --format=litert --quantize=int8` does, with the default bars (top-1
agreement with the Keras model >= 95%, at most 1 point of validation accuracy lost) and
the fallback that keeps the most sensitive layers in float (within 35% of float32's
file), then as `--quantize=int16x8` (int8 weights, int16 activations) with the same
bars, on the first 2,000 validation images (its kernels are slow: ~0.1 s an image). Where int8 is refused, float16 and dynamic are measured too (bars off). Datasets:

  fashion     the README's main job: small_similar, EfficientNet-Lite0, 2,000 images
  digits      the probe's: small_similar on digits, 5 epochs
  study-*     the study's targets (docs/study.md) with its pretrained seed_cnn at 28 px,
              frozen@fc2 (R1): similar (Fashion-MNIST 5-9), different (printed
              characters), digits; 100 training images per class, written to a folder

One JSON line per export to --out; about 8 minutes on 2 CPU cores.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STUDY_WEIGHTS = os.path.join(ROOT, "benchmarks", "study", "seed_cnn_fashion0-4.weights.h5")


def jobs(work):
    """(name, config overrides, regime) of each dataset's run."""
    study = dict(backbone="seed_cnn", image_size=28, weights=STUDY_WEIGHTS, cut="fc2",
                 augment=False, epochs=20, learning_rate=1e-2, examples_per_class=100,
                 val_fraction=0.5)
    return [
        ("fashion", dict(max_examples=2000)),
        ("digits", dict(dataset="digits", epochs=5)),
        ("study-similar", dict(dataset=os.path.join(work, "folders", "similar"), **study)),
        ("study-different", dict(dataset=os.path.join(work, "folders", "different"), **study)),
        ("study-digits", dict(dataset=os.path.join(work, "folders", "digits"), **study)),
    ]


def write_study_folders(work):
    """The study's targets as image folders: their first 1,000 training and 1,000
    validation images (the split is tl_keras's own, by seed)."""
    import numpy as np
    from PIL import Image

    from experiments import study

    settings = study.Settings(characters_train=1000, characters_val=1000)
    _, similar = study.fashion_halves()
    targets = {"similar": similar, "different": study.characters(settings),
               "digits": study.sklearn_digits()}
    for name, target in targets.items():
        folder = os.path.join(work, "folders", name)
        if os.path.exists(os.path.join(folder, ".written")):
            continue
        x = np.concatenate([target.x[:1000], target.x_val[:1000]])
        y = np.concatenate([target.y[:1000], target.y_val[:1000]])
        for i, (image, label) in enumerate(zip(x, y)):
            os.makedirs(os.path.join(folder, str(target.class_names[label])), exist_ok=True)
            Image.fromarray(np.asarray(image).squeeze().astype("uint8")).save(
                os.path.join(folder, str(target.class_names[label]), f"{i}.png"))
        open(os.path.join(folder, ".written"), "w").write("ok")


def train(name, overrides, work):
    import tl_keras

    workdir = os.path.join(work, "runs", name)
    if not os.path.exists(os.path.join(workdir, "metrics.json")):
        tl_keras.finetune(regime="small_similar", workdir=workdir, verbose="0", **overrides)
    return workdir


def export(name, workdir, work, quantize, **bars):
    from tl_keras import litert

    row = {"dataset": name, "quantize": quantize, **bars}
    tick = time.time()
    try:
        _, report = litert.export_run(workdir, os.path.join(work, "exports", name, quantize),
                                      quantize, verbose=False, **bars)
        row.update(written=True, keras_accuracy=report["keras_accuracy"],
                   litert_accuracy=report["litert_accuracy"],
                   top1_agreement=report["top1_agreement"],
                   float_layers=len(report["float_layers"]), bytes=report["bytes"],
                   size_vs_float32=report["size_vs_float32"], images=report["images"],
                   latency_ms_per_image=report["latency_ms_per_image"])
    except ValueError as e:
        row.update(written=False, refusal=str(e))
    row["seconds"] = round(time.time() - tick, 1)
    return row


def table(rows):
    lines = ["| dataset | quantize | written | Keras | LiteRT | points lost | agreement | "
             "layers in float | size vs float32 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["written"]:
            lines.append(
                f"| {r['dataset']} | {r['quantize']} | yes | {r['keras_accuracy']:.4f} | "
                f"{r['litert_accuracy']:.4f} | "
                f"{100 * (r['keras_accuracy'] - r['litert_accuracy']):.2f} | "
                f"{r['top1_agreement']:.2%} | {r['float_layers']} | {r['size_vs_float32']:.0%} |")
        else:
            lines.append(f"| {r['dataset']} | {r['quantize']} | refused | | | | | | |")
    return "\n".join(lines)


def parse(parser, table):
    """`parser`'s arguments (with --work and --out) and --table: with it, `table` of the
    rows recorded in --out is printed and the script ends; an --out that is a folder is
    refused before any work."""
    parser.add_argument("--table", action="store_true", help="print the recorded results")
    args = parser.parse_args()
    if args.table:
        with open(args.out) as f:
            print(table([json.loads(line) for line in f]))
        sys.exit(0)
    if os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a folder")
    return args


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/int8")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results_int8.jsonl"))
    args = parse(parser, table)
    write_study_folders(args.work)
    rows = []
    for name, overrides in jobs(args.work):
        workdir = train(name, overrides, args.work)
        row = export(name, workdir, args.work, "int8")
        rows += [row, export(name, workdir, args.work, "int16x8", eval_images=2000)]
        if not row["written"]:  # what the refusal suggests, measured
            rows += [export(name, workdir, args.work, q, min_agreement=0.0, max_drop=1.0)
                     for q in ("float16", "dynamic")]
        for r in rows[-4:]:
            if r["dataset"] == name:
                print(json.dumps(r), flush=True)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d")}) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
