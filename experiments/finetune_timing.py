"""Seconds to pretrain each fine-tuning task's body (once, into an empty cache) and
seconds of one static run after it, on one core.

    OMP_NUM_THREADS=1 python experiments/finetune_timing.py --suite finetune \
        --out experiments/results/finetune_timing.md

Goals (issue 23): pretraining <= 120 s once, a run <= 10 s after it.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="finetune")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    # An empty cache of its own, so that every body is pretrained here and timed.
    os.environ["RLHPO_CACHE"] = tempfile.mkdtemp(prefix="rlhpo-timing-")
    from rlhpo.tasks import load_suite
    from rlhpo.trainees import build_trainee
    from rlhpo.trainees.pretrained import cached_body

    suite = load_suite(a.suite)
    lines = [
        f"# Fine-tuning tasks of suite `{suite.name}`: pretraining and run time (1 core)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python experiments/finetune_timing.py --suite {a.suite}`; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, on a machine "
        "shared with other jobs (times are upper bounds).",
        "",
        "| task | split | model | target samples | relatedness | user lr | budget | "
        "pretrain s | run s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for split in ("train", "test"):
        for spec in suite.split(split):
            t0 = time.perf_counter()
            cached_body(spec)
            pre = time.perf_counter() - t0
            t0 = time.perf_counter()
            run = build_trainee(spec, seed=0)
            for _ in range(spec.intervals):
                run.train(spec.interval_samples)
                run.evaluate()
            run.evaluate("test")
            dt = time.perf_counter() - t0
            d = spec.dataset_args
            lines.append(
                f"| {spec.name} | {split} | {spec.model} | {d.get('n_samples')} | "
                f"{d.get('relatedness')} | {spec.default['lr']:.3g} | {spec.budget_samples} | "
                f"{pre:.1f} | {dt:.2f} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
