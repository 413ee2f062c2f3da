"""Whole `tools/finetune.py` processes of two versions of tl_keras, side by side.

Run:  python benchmarks/trace_once.py --before=REV [--repeats=2]
                                      [--out=benchmarks/results_trace_once.jsonl]

REV (a commit) is checked out into a temporary git worktree; each job then runs as
a user runs it, `python tools/finetune.py ...` in a new process, once with REV's
tl_keras and once with this checkout's, in alternating order, `--repeats` times,
nothing else running. Measured for the commit that builds a model's optimizer and
metric variables before Keras traces its train step (one trace per phase instead of
two) and makes Keras' saver reuse its attribute sets (docs/performance.md).

Jobs (offline data and weights):
  smoke   configs/smoke.py:large_similar on sklearn's digits with MobileNetV3-Small
          (the recorded runs' network; smoke.py's own is now its minimalistic variant),
          random weights, 32 px, 64 images, a head epoch then a fine-tuning epoch
  lite0   large_similar on 400 digits: EfficientNet-Lite0's ImageNet weights, 96 px,
          a head epoch then a fine-tuning epoch

One JSON line per process to --out: job, version, seconds (the whole process), the
run's best validation metric.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOBS = {
    "smoke": ["--config=configs/smoke.py:large_similar", "--dataset=digits",
              "--backbone=mobilenet_v3_small"],
    "lite0": ["--regime=large_similar", "--dataset=digits", "--max_examples=400",
              "--config.epochs=2", "--config.head_epochs=1"],
}


def run(tree, job, workdir):
    """Seconds of one `tools/finetune.py` process of the tl_keras in `tree`, and its run's
    metrics."""
    env = dict(os.environ, PYTHONPATH=tree)  # ahead of the editable install's finder
    tick = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.join(tree, "tools", "finetune.py"),
                           *JOBS[job], f"--workdir={workdir}"], cwd=tree, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - tick
    if done.returncode:
        raise SystemExit(f"{job} in {tree} failed:\n{done.stderr[-2000:]}")
    with open(os.path.join(workdir, "metrics.json")) as f:
        return seconds, json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare with")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks",
                                                      "results_trace_once.jsonl"))
    args = parser.parse_args()
    jobs = args.jobs.split(",")
    unknown = sorted(set(jobs) - set(JOBS))
    if unknown:
        parser.error(f"unknown jobs {unknown}; jobs: {', '.join(JOBS)}")
    rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="trace_once_")
    before = os.path.join(work, "before")
    subprocess.run(["git", "worktree", "add", "--detach", "-q", before, rev], cwd=ROOT,
                   check=True)
    versions = {f"before ({rev})": before, f"after (on {head}, working tree)": ROOT}
    try:
        for repeat in range(args.repeats):
            order = list(versions.items())
            if repeat % 2:
                order.reverse()
            for job in jobs:
                for version, tree in order:
                    workdir = os.path.join(work, f"{job}-{repeat}-{len(os.listdir(work))}")
                    seconds, metrics = run(tree, job, workdir)
                    row = {"job": job, "version": version, "repeat": repeat,
                           "seconds": round(seconds, 1),
                           "best": {k: round(v, 4) for k, v in metrics.items()
                                    if k.startswith("best_val_")}}
                    print(json.dumps(row), flush=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", before], cwd=ROOT)


if __name__ == "__main__":
    main()
