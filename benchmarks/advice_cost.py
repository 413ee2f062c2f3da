"""What the advice costs against what it saves, on every dataset tl_keras is measured on.

Run:  python benchmarks/advice_cost.py [--work=/tmp/advice_cost]
                                       [--out=benchmarks/results_advice_cost.jsonl]
      python benchmarks/advice_cost.py --table     # print the recorded results

For each dataset, in one process, one after another (so the ratios are side by side):
`tl_keras.advise_regime` with its pilots (the advisor's defaults), then each of the four
regimes trained by `tl_keras.finetune` with its own config file -- each call reads its
data, as a user's does. Datasets (benchmarks/int8.py's):

  fashion     the README's main job: EfficientNet-Lite0, 96 px, 2,000 Fashion-MNIST images
  digits      sklearn's 1,797 digits (the probe's case), EfficientNet-Lite0, 96 px
  study-*     the study's targets (docs/study.md) as image folders, its pretrained seed_cnn
              at 28 px: similar (Fashion-MNIST 5-9), different (printed characters), digits

One JSON line per dataset to --out: the advice's seconds, each regime's seconds and
val_accuracy (at its config file's own cut: not a score of the advice), the advice over
the four regimes, the advised regime and its pilots.
About 40 minutes on 2 CPU cores (the README's job: 25).
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

REGIMES = ("small_similar", "small_different", "large_similar", "large_different")


def jobs(work):
    """(name, overrides) of each dataset: its data and backbone, not a recipe."""
    import int8

    study = dict(backbone="seed_cnn", image_size=28, weights=int8.STUDY_WEIGHTS,
                 val_fraction=0.5)
    return [
        ("fashion", dict(max_examples=2000)),
        ("digits", dict(dataset="digits")),
        *[(f"study-{name}", dict(dataset=os.path.join(work, "folders", name), **study))
          for name in ("similar", "different", "digits")],
    ]


def measure(name, overrides, work):
    import keras

    import tl_keras

    row = {"dataset": name}
    keras.backend.clear_session()
    tick = time.perf_counter()
    advised = tl_keras.advise_regime(workdir=os.path.join(work, name, "advice"), verbose="0",
                                     **overrides).advice
    row["advice_seconds"] = round(time.perf_counter() - tick, 1)
    row.update(advice=advised.regime, cut=advised.cut, pilots=advised.pilots,
               pilot_images=advised.pilot_images, reasons=advised.reasons)
    row["regimes"] = {}
    for regime in REGIMES:
        keras.backend.clear_session()
        tick = time.perf_counter()
        run = tl_keras.finetune(regime=regime, workdir=os.path.join(work, name, regime),
                                verbose="0", report=False, **overrides)
        row["regimes"][regime] = {"seconds": round(time.perf_counter() - tick, 1),
                                  "val_accuracy": round(run.metrics["val_accuracy"], 4)}
    total = sum(r["seconds"] for r in row["regimes"].values())
    row.update(four_regimes_seconds=round(total, 1),
               advice_over_four_regimes=round(row["advice_seconds"] / total, 4))
    return row


def table(rows):
    """Costs only: each regime ran at its config file's own cut (small_different: early),
    not at the advised one, so their accuracies do not score the advice."""
    lines = ["| dataset | advice | advice seconds | four regimes' seconds | advice / four | "
             "pilots not run |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['advice']}@{r['cut']} | {r['advice_seconds']:.0f} | "
                     f"{r['four_regimes_seconds']:.0f} | {r['advice_over_four_regimes']:.2f} | "
                     f"{', '.join(r['pilot_images'].get('not_run', [])) or '-'} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/advice_cost")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks",
                                                      "results_advice_cost.jsonl"))
    parser.add_argument("--datasets", default="", help="comma-separated names (default: all)")
    import int8

    args = int8.parse(parser, table)
    chosen = [n for n in args.datasets.split(",") if n]
    known = [name for name, _ in jobs(args.work)]
    if set(chosen) - set(known):
        parser.error(f"unknown datasets {sorted(set(chosen) - set(known))}; valid: {known}")
    int8.write_study_folders(args.work)
    rows = []
    for name, overrides in jobs(args.work):
        if chosen and name not in chosen:
            continue
        rows.append(measure(name, overrides, args.work))
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps({**rows[-1], "date": time.strftime("%Y-%m-%d")}) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
