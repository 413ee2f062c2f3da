"""What the regime advisor costs, with and without its pilot runs: tools/benchmark.py's
part 5 alone (the full benchmark takes ~15 minutes; this one ~7 on 2 CPU cores).

Run:  python benchmarks/advisor_cost.py [--out=benchmarks/results_advisor.json]
      python benchmarks/advisor_cost.py --advisor.pilot_passes=1.0   # another pilot budget

On part 1's data (EfficientNet-Lite0 with its ImageNet weights, 96 px, 1,000
Fashion-MNIST training images): the advice from the scores alone, the advice with
the pilot runs, then each of the four regimes trained with its own config file --
in one process, one after another, so the ratios are measured side by side.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results_advisor.json"))
    parser.add_argument("--advisor.pilot_passes", dest="passes", type=float, default=None)
    args = parser.parse_args()
    from tl_keras import plan as plan_lib
    from experiments import benchmark

    settings = benchmark.Settings()
    plan, datasets = benchmark.frozen_regime_data(settings)
    if args.passes is not None:
        config = plan_lib.editable(plan.config)
        config.advisor.pilot_passes = args.passes
        plan = plan_lib.resolve(config)
    start = time.perf_counter()
    result = benchmark.advisor_cost(settings, plan, datasets)
    result.update(date=time.strftime("%Y-%m-%d %H:%M"), cpu_count=os.cpu_count(),
                  pilot_passes=plan.config.advisor.pilot_passes,
                  command=" ".join(["python", "benchmarks/advisor_cost.py", *sys.argv[1:]]),
                  total_seconds=round(time.perf_counter() - start, 1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    for label, value in benchmark.advisor_rows(result):
        print(f"{label:<22} {value}")
    print(f"Results: {args.out}")


if __name__ == "__main__":
    main()
