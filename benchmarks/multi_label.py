"""Multi-label on real images: 2x2 mosaics of Fashion-MNIST items, every regime against a
one-vs-rest logistic regression on the same frozen features.

Run:  python benchmarks/multi_label.py [--train=5000] [--val=1000] [--seeds=0,1,2]
          [--regimes=small_similar,...,large_different+scratch,small_different@late]
          [--advise]
          [--out=benchmarks/results_multi_label.jsonl]

Each mosaic is 56 px: four items drawn at random (seeded) from Fashion-MNIST's training
images (the validation mosaics from its test images); its labels are the classes present
(1 to 4 of 10). The mosaics are written once as PNGs with a labels.csv (`a|b` cells, a
`split` column) and read by tl_keras as any label table, with task=multi_label, on the
offline default backbone at its default size (configs/<regime>.py, as the README's job).
Every run is scored on the validation mosaics by scikit-learn: mAP (macro average precision)
and micro-F1 at 0.5. The floor: scikit-learn's one-vs-rest logistic regression on the frozen
features small_similar's head reads (the same backbone, cut, image size and images). One
JSON line per run is appended to --out.

--advise: the regime advisor instead (`tl_keras.advise_regime`, pilots included, as
--regime=auto measures), one line per seed: its regime, cut and reasons, LogME per cut,
the pilots' held-out mAP and its seconds -- to set beside the regimes' measured mAP.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "boot")


def write_mosaics(root, n_train, n_val, seed=0):
    """`root`/images/*.png and `root`/labels.csv, once per (n_train, n_val, seed)."""
    from PIL import Image

    from tl_keras import arrays

    table = os.path.join(root, "labels.csv")
    marker = os.path.join(root, ".written")
    wanted = f"{n_train},{n_val},{seed}"
    if os.path.exists(marker) and open(marker).read() == wanted:
        return table
    x, y, x_test, y_test, _ = arrays.load_builtin("fashion_mnist")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = ["image,labels,split"]
    for split, n, (images, labels) in (("train", n_train, (x, y)), ("valid", n_val,
                                                                     (x_test, y_test))):
        for i in range(n):
            pick = rng.choice(len(images), 4, replace=False)
            tiles = [np.asarray(images[j]).reshape(28, 28) for j in pick]
            mosaic = np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]]).astype("uint8")
            name = f"images/{split}_{i}.png"
            Image.fromarray(mosaic).save(os.path.join(root, name))
            present = sorted({CLASSES[int(labels[j])] for j in pick})
            rows.append(f"{name},{'|'.join(present)},{split}")
    with open(table, "w") as f:
        f.write("\n".join(rows) + "\n")
    open(marker, "w").write(wanted)
    return table


def scores(probabilities, labels):
    from sklearn.metrics import average_precision_score, f1_score

    return {"mAP": round(float(average_precision_score(labels, probabilities,
                                                         average="macro")), 4),
            "micro_f1": round(float(f1_score(labels, probabilities >= 0.5,
                                             average="micro")), 4)}


def outputs(model, pipeline):
    """(model outputs, labels) over a batched pipeline of (images, label vectors)."""
    got, labels = [], []
    for x, y in pipeline:
        got.append(np.asarray(model(x, training=False)))
        labels.append(np.asarray(y))
    return np.concatenate(got), np.concatenate(labels)


def run_regime(table, regime, seed, workdir):
    import keras

    import tl_keras
    from tl_keras import data

    began = time.time()
    name, _, init = regime.partition("+")  # large_different+scratch: init=scratch
    name, _, cut = name.partition("@")      # small_different@late: cut there
    run = tl_keras.finetune(table, regime=name, task="multi_label", seed=seed,
                            workdir=workdir, verbose="0", **({"init": init} if init else {}),
                            **({"cut": cut} if cut else {}))
    seconds = time.time() - began
    plan = run.plan
    datasets = data.load(plan.config, plan.image_size)
    model = keras.saving.load_model(os.path.join(workdir, "model.keras"), compile=False)
    probabilities, labels = outputs(model, datasets.val)
    result = {"regime": regime, "seed": seed, **scores(probabilities, labels),
              "keras_val_mAP": round(run.metrics["val_mAP"], 4), "seconds": round(seconds, 1),
              "backbone": plan.config.backbone, "image_size": plan.image_size,
              "epochs": plan.config.epochs, "train": datasets.train_examples,
              "val": datasets.val_examples}
    if regime == "small_similar":  # the floor, on this run's frozen features
        result["floor"] = floor(model, datasets, seed)
    return result


def advise(table, seed, workdir):
    import tl_keras

    began = time.time()
    advice = tl_keras.advise_regime(table, task="multi_label", seed=seed, workdir=workdir,
                                    verbose="0").advice
    return {"advice": advice.regime, "cut": advice.cut, "init": advice.init, "seed": seed,
            "decided_by": advice.decided_by, "reasons": advice.reasons,
            "logme": {cut: row.get("pretrained") for cut, row in advice.scores.items()},
            "knn_mAP": {cut: row.get("knn_pretrained") for cut, row in advice.scores.items()},
            "pilots": advice.pilots, "pilot_images": advice.pilot_images,
            "sample": advice.sample, "seconds": round(time.time() - began, 1),
            "backbone": advice.backbone}


def floor(model, datasets, seed):
    """One-vs-rest logistic regression on the features small_similar's head reads."""
    import keras
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    extract = keras.Model(model.input, model.get_layer("feature_norm").input)
    x_train, y_train = outputs(extract, datasets.plain_train())
    x_val, y_val = outputs(extract, datasets.val)
    began = time.time()
    classifier = OneVsRestClassifier(LogisticRegression(max_iter=2000, random_state=seed))
    classifier.fit(x_train, y_train)
    return {**scores(classifier.predict_proba(x_val), y_val),
            "fit_seconds": round(time.time() - began, 1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--regimes", default="small_similar,small_different,large_similar,"
                        "large_different+scratch")  # large_different's default: large_similar
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "mosaics"))
    parser.add_argument("--out", default="benchmarks/results_multi_label.jsonl")
    parser.add_argument("--advise", action="store_true",
                        help="the regime advisor's advice per seed instead of the regimes")
    args = parser.parse_args()
    table = write_mosaics(args.root, args.train, args.val)
    runs = tempfile.mkdtemp(prefix="multi_label_runs_")
    for seed in map(int, args.seeds.split(",")):
        for regime in ["advice"] if args.advise else args.regimes.split(","):
            folder = os.path.join(runs, f"{regime}_{seed}")
            result = (advise(table, seed, folder) if args.advise else
                      run_regime(table, regime, seed, folder))
            print(json.dumps(result), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
