"""Seconds per static run (task default hyperparameters, one core) of a suite's tasks.

    python experiments/suite_timing.py --suite default --split test \
        --out experiments/results/suite_timing.md

Each task is run once untimed (data generation, imports) and then timed over
``--repeats`` seeds; the table gives the mean wall time of one run and the static
validation/test score.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="default")
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from rlhpo.baselines.single import preload, run_single
    from rlhpo.env import run_seed_for
    from rlhpo.tasks import load_suite

    torch.set_num_threads(1)
    suite = load_suite(args.suite)
    rows = []
    for spec in suite.split(args.split):
        preload(spec)
        run_single(spec, spec.default, run_seed_for(0))  # warm-up, untimed
        secs, tests = [], []
        for s in range(args.repeats):
            t0 = time.perf_counter()
            out = run_single(spec, spec.default, run_seed_for(s))
            secs.append(time.perf_counter() - t0)
            tests.append(out.test_norm)
        row = (
            spec.name,
            spec.family or spec.model,
            spec.dataset,
            spec.optimizer,
            spec.budget_samples,
            spec.intervals,
            sum(secs) / len(secs),
            sum(tests) / len(tests),
        )
        rows.append(row)
        print(f"{row[0]:24s} {row[6]:6.2f} s  static norm test {row[7]:.3f}", flush=True)
    lines = [
        f"# Seconds per static run: suite `{suite.name}`, split `{args.split}`",
        "",
        f"Command: `python experiments/suite_timing.py --suite {args.suite} --split {args.split} "
        f"--repeats {args.repeats}`",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        "1 thread; mean of the timed runs after one untimed warm-up run; the task default "
        "hyperparameters. Normalised test score: 0 = chance (or the mean predictor), 1 = perfect.",
        f"Load average (1 min) when the measurement ended: {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores; a loaded machine inflates every figure.",
        "",
        "| task | family | dataset | optimizer | budget (samples) | intervals | s / static run "
        "| static norm. test |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]:.2f} | {r[7]:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
