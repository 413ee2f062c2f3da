"""Experiment drivers, not the library: what `tools/study.py` (does the regime table
hold?) and `tools/benchmark.py` (speed and accuracy, written to benchmarks/) run.

They import `tl_keras` as a user would; nothing in `tl_keras` imports them.
"""
