"""Headroom of fine-tuning tasks: static at the user's lr against a small lr grid.

    OMP_NUM_THREADS=1 python experiments/finetune_lr_grid.py --suite finetune --split test \
        --seeds 5 --out experiments/results/finetune_lr_grid.md

Each cell is the mean test accuracy over seeds of a static run (the task's default
batch size and dropout) at that lr, from the seeds' shared initialisation and data
order (``rlhpo.env.run_seed_for``, as ``rlhpo compare`` uses). The grid's best lr is
picked by mean *validation* accuracy, and its test accuracy is reported: the gap is
what knowing the right lr is worth on that task.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 2e-2)


def mean_scores(spec, lr: float, seeds: int) -> tuple[float, float]:
    """Mean validation and test accuracy of static runs of ``spec`` at ``lr``."""
    from rlhpo.baselines import run_single
    from rlhpo.env import run_seed_for

    outs = [run_single(spec, {**spec.default, "lr": lr}, run_seed_for(s)) for s in range(seeds)]
    return (
        statistics.fmean(o.val_score for o in outs),
        statistics.fmean(o.test_score for o in outs),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="finetune")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from rlhpo.tasks import load_suite

    suite = load_suite(a.suite)
    t0 = time.perf_counter()
    head = " | ".join(f"{lr:g}" for lr in GRID)
    lines = [
        f"# Fine-tuning headroom: static at the user's lr vs an lr grid (suite `{a.suite}`, "
        f"split `{a.split}`)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python experiments/finetune_lr_grid.py --suite {a.suite} "
        f"--split {a.split} --seeds {a.seeds}`. Mean test accuracy over {a.seeds} seeds; "
        "best = the grid lr with the best mean validation accuracy (its test accuracy).",
        "",
        f"| task | user lr | static at user lr | {head} | best lr | best | gap |",
        "|---|---:|---:|" + "---:|" * len(GRID) + "---:|---:|---:|",
    ]
    for spec in suite.split(a.split):
        user = spec.default["lr"]
        _, static = mean_scores(spec, user, a.seeds)
        cells = {lr: mean_scores(spec, lr, a.seeds) for lr in GRID}
        best = max(GRID, key=lambda lr, c=cells: c[lr][0])  # picked on validation
        lines.append(
            f"| {spec.name} | {user:g} | {static:.3f} | "
            + " | ".join(f"{cells[lr][1]:.3f}" for lr in GRID)
            + f" | {best:g} | {cells[best][1]:.3f} | {cells[best][1] - static:+.3f} |"
        )
        print(lines[-1], flush=True)
    lines += ["", f"{time.perf_counter() - t0:.0f} s on one core (after the cached pretraining)."]
    text = "\n".join(lines) + "\n"
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
