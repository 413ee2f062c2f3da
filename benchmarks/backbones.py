"""Backbones measured: MobileNetV2 (torchvision's ImageNet weights) beside EfficientNet-Lite0,
LoRA beside full fine-tuning, and the speed of foundation-sized KerasHub backbones.

Run:  python benchmarks/backbones.py --part=accuracy [--seeds=0,1] [--variants=...]
      python benchmarks/backbones.py --part=speed
      python benchmarks/backbones.py --table

`--part=accuracy`: each (job, backbone, variant, seed) a fresh process running
`tl_keras.finetune`, one JSON line appended to benchmarks/results_backbones.jsonl
(val_accuracy, trainable parameters, peak RSS, seconds); what is there already is
not run again. The jobs:
  readme  the README's main job: 2,000 Fashion-MNIST images at 96 px, 10 epochs,
          augmentation as configured (the small regimes);
  large   5,000 images at 64 px, augmentation off, 4 epochs (1 head-only), as
          benchmarks/recipes.py (every regime, and LoRA).
`--part=speed`: images/s of one process per case on random images, batch 32 at
64 px for the CNNs (full fine-tuning against LoRA rank 8) and batch 8 at 224 px
for a DINOv2-small-sized and a ViT-B/16-sized KerasHub backbone (random weights,
written with save_to_preset and loaded as `hub:` folders): the feature pass, a
training step with the backbone frozen, and one with LoRA. Written to
benchmarks/results_backbones_speed.json. Nothing else should run beside it.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ACCURACY = os.path.join(HERE, "results_backbones.jsonl")
SPEED = os.path.join(HERE, "results_backbones_speed.json")

JOBS = {
    "readme": dict(dataset="fashion_mnist", max_examples=2000),
    "large": dict(dataset="fashion_mnist", max_examples=5000, image_size=64, augment=False,
                  epochs=4, head_epochs=1),
}
VARIANTS = {  # name: (jobs, overrides)
    "small_similar": (("readme", "large"), dict(regime="small_similar")),
    "small_different": (("readme",), dict(regime="small_different")),
    # What tools/advise.py --backbone=efficientnet_lite0,mobilenet_v2 advises on the README
    # job (both: small_different at late): do its pilots rank the two as the runs do?
    "small_different_late": (("readme",), dict(regime="small_different", cut="late")),
    "large_similar": (("large",), dict(regime="large_similar")),
    "large_different_scratch": (("large",), dict(regime="large_different", init="scratch")),
    "large_similar_lora8": (("large",), dict(regime="large_similar", lora_rank=8)),
    # LoRA's adapters start at zero and are few: the field trains them at a higher rate.
    "large_similar_lora8_1e-3": (("large",), dict(regime="large_similar", lora_rank=8,
                                                  finetune_learning_rate=1e-3)),
}
BACKBONES = ("efficientnet_lite0", "mobilenet_v2")

CHILD = r"""
import json, resource, sys
import tl_keras
overrides = json.loads(sys.argv[1])
regime = overrides.pop("regime")
run = tl_keras.finetune(regime=regime, verbose="2", report=False, **overrides)
m = run.metrics
print("RESULT " + json.dumps({
    "val_accuracy": m["val_accuracy"], "best_val_accuracy": m["best_val_accuracy"],
    "trainable_params": m["trainable_params"], "wall_seconds": m["wall_seconds"],
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def run_accuracy(seeds, variants):
    done = set()
    if os.path.exists(ACCURACY):
        with open(ACCURACY) as f:
            done = {(r["job"], r["backbone"], r["variant"], r["seed"]) for r in map(json.loads, f)}
    for seed in seeds:
        for name in variants:
            jobs, overrides = VARIANTS[name]
            for job in jobs:
                for backbone in BACKBONES:
                    if (job, backbone, name, seed) in done:
                        continue
                    settings = {**JOBS[job], **overrides, "backbone": backbone, "seed": seed,
                                "workdir": os.path.join("runs", "bench_backbones",
                                                        f"{job}_{backbone}_{name}_{seed}")}
                    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)],
                                         capture_output=True, text=True)
                    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                    if out.returncode or not lines:
                        sys.exit(f"{job} {backbone} {name} seed {seed} failed:\n{out.stderr[-3000:]}")
                    row = {"job": job, "backbone": backbone, "variant": name, "seed": seed,
                           **json.loads(lines[-1][7:])}
                    print(json.dumps(row), flush=True)
                    with open(ACCURACY, "a") as f:
                        f.write(json.dumps(row) + "\n")


SPEED_CHILD = r"""
import json, os, resource, sys, tempfile, time
import keras, numpy as np
case = json.loads(sys.argv[1])
from tl_keras import backbones, model as model_lib, trainable, recipe
name = case["backbone"]
if case.get("hub"):
    import keras_hub
    folder = os.path.join(tempfile.mkdtemp(), case["hub"])
    cls = getattr(keras_hub.models, case["class"])
    cls(**case["config"]).save_to_preset(folder)
    name = "hub:" + folder
size, batch, steps = case["size"], case["batch"], case["steps"]
cut = backbones.build_backbone(name, weights="none", image_size=size, cut="top")
model = model_lib.build_classifier(cut.model, name, 10)
x = np.random.default_rng(0).integers(0, 255, (batch * steps, size, size, 3)).astype("float32")
y = np.arange(batch * steps) % 10
result = {}
def timed(fn):
    fn(batch)  # trace and warm up on one batch
    start = time.perf_counter(); fn(None)
    return round(batch * steps / (time.perf_counter() - start), 2)
if case["mode"] == "features":
    extractor = keras.Model(model.input, model.get_layer("feature_norm").input)
    result["images_per_s"] = timed(lambda n: extractor.predict(x[:n] if n else x, batch_size=batch, verbose=0))
else:
    phase = trainable.Phase("finetune", "all" if case["mode"] != "frozen" else "head", 0, 1, 1e-4,
                            True, recipe=recipe.Recipe(lora_rank=case.get("lora_rank", 0)))
    trainable.apply_phase(model, phase)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4), loss="sparse_categorical_crossentropy")
    result["images_per_s"] = timed(lambda n: model.fit(x[:n] if n else x, y[:n] if n else y,
                                                       batch_size=batch, epochs=1, verbose=0))
    result["trainable_params"] = trainable.count_params(model)[0]
result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print("RESULT " + json.dumps(result))
"""

DINOV2_SMALL = dict(hub="dinov2_small_sized", **{"class": "DINOV2Backbone"}, config=dict(
    patch_size=14, num_layers=12, hidden_dim=384, num_heads=6, intermediate_dim=1536,
    image_shape=(224, 224, 3), position_embedding_shape=(518, 518, 3)))
VIT_B16 = dict(hub="vit_b16_sized", **{"class": "ViTBackbone"}, config=dict(
    image_shape=(224, 224, 3), patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
    mlp_dim=3072))


def speed_cases():
    for backbone in BACKBONES:
        for mode, extra in (("full", {}), ("lora", {"lora_rank": 8})):
            yield dict(backbone=backbone, mode=mode, size=64, batch=32, steps=8, **extra)
    for hub in (DINOV2_SMALL, VIT_B16):
        for mode, extra in (("features", {}), ("frozen", {}), ("lora", {"lora_rank": 8})):
            yield dict(backbone=hub["hub"], mode=mode, size=224, batch=8, steps=3, **hub,
                       **extra)


def run_speed():
    results = []
    for case in speed_cases():
        out = subprocess.run([sys.executable, "-c", SPEED_CHILD, json.dumps(case)],
                             capture_output=True, text=True)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"{case['backbone']} {case['mode']} failed:\n{out.stderr[-3000:]}")
        row = {k: case[k] for k in ("backbone", "mode", "size", "batch")}
        row.update(json.loads(lines[-1][7:]))
        print(json.dumps(row), flush=True)
        results.append(row)
    with open(SPEED, "w") as f:
        json.dump(results, f, indent=1)


def table():
    with open(ACCURACY) as f:
        rows = [json.loads(line) for line in f]
    groups = {}
    for r in rows:
        groups.setdefault((r["job"], r["variant"], r["backbone"]), []).append(r)
    lines = ["| job | variant | backbone | val_accuracy per seed | mean | trainable params | "
             "peak RSS MB | seconds |", "|---" * 8 + "|"]
    for (job, variant, backbone), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        accs = [r["val_accuracy"] for r in rs]
        lines.append(f"| {job} | {variant} | {backbone} | "
                     + " / ".join(f"{a:.4f}" for a in accs)
                     + f" | {sum(accs) / len(accs):.4f} | {rs[0]['trainable_params']:,} | "
                     + f"{max(r['peak_rss_mb'] for r in rs)} | "
                     + " / ".join(f"{r['wall_seconds']:.0f}" for r in rs) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["accuracy", "speed"], default="accuracy")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--table", action="store_true", help="print the accuracy table and stop")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    if args.part == "speed":
        run_speed()
        return
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    run_accuracy([int(s) for s in args.seeds.split(",")], variants)


if __name__ == "__main__":
    main()
