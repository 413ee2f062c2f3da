"""The study's similar/large R3 (finetuned@fc2) under other fine-tuning settings, 3 seeds.

Run:  python benchmarks/study_finetune.py [--out=benchmarks/results_study_finetune.json]

Each cell as tools/study.py --recipe=defaults runs it (experiments/study.py:
30,000 Fashion-MNIST 5-9 images, 2 epochs, batch 256, the source network of
benchmarks/study_recipe/), alone in a fresh feature store, with the overrides below.
R4 (scratch) in that study: 0.945 +- 0.002. About 2 minutes on 2 CPU cores.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    "study's (head 1 epoch, then all 1 epoch at 3e-4)": {},
    "finetune_learning_rate 1e-3": {"finetune_learning_rate": 1e-3},
    "head_epochs 0 (all 2 epochs at 3e-4)": {"head_epochs": 0},
    "head_epochs 0, finetune_learning_rate 1e-3": {"head_epochs": 0,
                                                   "finetune_learning_rate": 1e-3},
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks",
                                                      "results_study_finetune.json"))
    parser.add_argument("--work", default="/tmp/study_finetune")
    args = parser.parse_args()
    import keras

    from tl_keras import data, features
    from experiments import study

    settings = study.Settings(recipe=study.RECIPE_DEFAULTS)
    weights = os.path.join(ROOT, "benchmarks", "study_recipe", "seed_cnn_fashion0-4.weights.h5")
    _, similar = study.fashion_halves()
    results = {}
    for v, (name, overrides) in enumerate(VARIANTS.items()):
        accuracies = []
        for seed in settings.seeds:
            cell = study.Cell("similar", "large", "finetuned", "fc2", seed)
            examples = study.subset(similar, "large", seed, settings)
            config = study.cell_config(cell, settings, weights,
                                       os.path.join(args.work, str(v), str(seed)))
            config.update(overrides)
            keras.backend.clear_session()
            metrics, _ = study.run_cell(
                config, lambda: data.make_datasets(examples, config, study.IMAGE_SIZE),
                features.FeatureStore())
            accuracies.append(round(metrics["val_accuracy"], 4))
        results[name] = accuracies
        print(f"{name}: {accuracies}, mean {sum(accuracies) / len(accuracies):.4f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
