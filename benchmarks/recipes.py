"""The large regimes' recipe measured: variants of one job, each seed in a fresh process.

Run:  python benchmarks/recipes.py [--job=fashion|characters] [--variants=new,old,...]
                                   [--seeds=0,1] [--out=FILE]

The job (issue "The large regimes, trained the way the field trains them"):
EfficientNet-Lite0 with its ImageNet weights, 5,000 Fashion-MNIST training
images, 64 px, augmentation off, 4 epochs (1 head-only), validated on all
10,000 test images. `--job=characters`: the same on the regime study's printed
characters (experiments/study.py, unlike ImageNet), 6,250 drawn once into
a folder, 1,250 of them held out by seed. `--job=digits --variants=cached,fit`:
sklearn's digits at 96 px, 10 epochs of `small_similar`, the head trained on cached
features against plain `fit` through the frozen backbone. Each run appends one JSON line (job, variant, seed, overrides,
val_accuracy, best_val_accuracy, wall seconds) to `--out`
(benchmarks/results_recipes.jsonl); a variant and seed already there is not
run again. Nothing else should run beside it when its seconds are quoted.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

JOB = dict(dataset="fashion_mnist", max_examples=5000, image_size=64, augment=False,
           epochs=4, head_epochs=1)

# Issue "Reliable under faults" 6: the head on cached features against plain `fit`
# through the frozen backbone, the same images (sklearn digits at 96 px), 10 epochs.
DIGITS = dict(dataset="digits", max_examples=0, augment=False, epochs=10)

# The recipe's pieces, each switched off one at a time from "new"; "old" is the recipe
# before them (a constant AdamW rate), spelled out so that defaults do not move it.
NEW = dict(finetune_learning_rate=3e-4, schedule="cosine", warmup=0.1, clipnorm=1.0,
           layer_decay=1.0)
OLD = dict(finetune_learning_rate=1e-5, schedule="constant", warmup=0.0, clipnorm=0.0,
           layer_decay=1.0)
VARIANTS = {
    "frozen": dict(regime="small_similar", epochs=10),
    "old": dict(regime="large_similar", **OLD),
    "old_3e-4": dict(regime="large_similar", **dict(OLD, finetune_learning_rate=3e-4)),
    "new": dict(regime="large_similar", **NEW),
    "layer_decay_0.75": dict(regime="large_similar", **dict(NEW, layer_decay=0.75)),
    "layer_decay_0.75_constant": dict(regime="large_similar", **dict(
        NEW, layer_decay=0.75, schedule="constant", warmup=0.0)),
    "new_constant": dict(regime="large_similar", **dict(NEW, schedule="constant", warmup=0.0)),
    "new_no_warmup": dict(regime="large_similar", **dict(NEW, warmup=0.0)),
    "new_no_clip": dict(regime="large_similar", **dict(NEW, clipnorm=0.0)),
    "new_1e-3": dict(regime="large_similar", **dict(NEW, finetune_learning_rate=1e-3)),
    "new_ema": dict(regime="large_similar", **dict(NEW, ema=0.99)),
    "new_sgd": dict(regime="large_similar", **dict(NEW, optimizer="sgd",
                                                   finetune_learning_rate=0.01)),
    "new_mixup": dict(regime="large_similar", **dict(NEW, batch_augment="mixup")),
    "new_cutmix": dict(regime="large_similar", **dict(NEW, batch_augment="cutmix")),
    "new_size_rule": dict(regime="large_similar", **dict(NEW, schedule="size_rule")),
    # RandAugment alone (no flips, zoom or rotation), 2 ops at Keras' default strength.
    "new_randaugment": dict(regime="large_similar", **dict(
        NEW, augment=True, augment_flip="none", augment_zoom=0.0, augment_rotation=0.0,
        rand_augment=2, rand_augment_magnitude=0.5)),
    "scratch_old": dict(regime="large_different", init="scratch",
                        **dict(OLD, finetune_learning_rate=3e-4)),
    "scratch_new": dict(regime="large_different", init="scratch", **NEW),
    "different_old": dict(regime="large_different", **OLD),
    "cached": dict(regime="small_similar", cache_features=True),
    "fit": dict(regime="small_similar", cache_features=False),
    "different_new": dict(regime="large_different", **NEW),
}

CHILD = r"""
import json, sys
import tl_keras
overrides = json.loads(sys.argv[1])
regime = overrides.pop("regime")
run = tl_keras.finetune(regime=regime, verbose="2", report=False, **overrides)
m = run.metrics
print("RESULT " + json.dumps({"val_accuracy": m["val_accuracy"],
                              "best_val_accuracy": m["best_val_accuracy"],
                              "wall_seconds": m["wall_seconds"]}))
"""


def characters_folder(root=os.path.join(tempfile.gettempdir(), "tl_keras_characters"), n=6250):
    """The study's printed characters as a folder of class subfolders (written once)."""
    if os.path.exists(os.path.join(root, ".written")):
        return root
    from PIL import Image

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import study

    x, y = study.printed_characters(n, seed=1)
    for i, (image, label) in enumerate(zip(x, y)):
        folder = os.path.join(root, f"char_{study.CHARACTERS[label]}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, f"{i}.png"))
    open(os.path.join(root, ".written"), "w").close()
    return root


def table(path):
    """The results in `path` as markdown: a row per job and variant, val_accuracy per seed,
    the mean, and the settings it ran with beside the job's."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| job | variant | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean | settings |", "|---" * (len(seeds) + 4) + "|"]
    order = {}
    for r in rows:
        order.setdefault((r.get("job", "fashion"), r["variant"]), {})[r["seed"]] = r
    for (job, variant), by_seed in order.items():
        values = [by_seed[s]["val_accuracy"] for s in seeds if s in by_seed]
        settings = ", ".join(f"{k}={v}" for k, v in next(iter(by_seed.values()))["overrides"].items())
        lines.append(f"| {job} | {variant} | " + " | ".join(
            f"{by_seed[s]['val_accuracy']:.4f}" if s in by_seed else "" for s in seeds)
            + f" | {sum(values) / len(values):.4f} | {settings} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", default="fashion", choices=["fashion", "characters", "digits"])
    parser.add_argument("--variants", default="new,old")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                      "results_recipes.jsonl"))
    parser.add_argument("--table", action="store_true",
                        help="Print the results in --out as a markdown table and stop.")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {(r.get("job", "fashion"), r["variant"], r["seed"]) for r in map(json.loads, f)}
    job = {"fashion": lambda: JOB, "digits": lambda: DIGITS,
           "characters": lambda: dict(JOB, dataset=characters_folder())}[args.job]()
    for seed in map(int, args.seeds.split(",")):
        for name in names:
            if (args.job, name, seed) in done:
                continue
            overrides = dict(job, **VARIANTS[name], seed=seed,
                             workdir=os.path.join(tempfile.mkdtemp(), "run"))
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides)],
                                 capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                print(f"{name} seed {seed} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            result = dict(job=args.job, variant=name, seed=seed, overrides=VARIANTS[name],
                          **json.loads(line[0][len("RESULT "):]))
            print(json.dumps(result), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
