"""Seconds per environment step and per full episode, per task, at the suite's
default budget (one torch thread, default hyperparameters, no-op actions).

    python experiments/env_speed.py [--suite default] [--repeats 2]

Writes experiments/results/env_speed.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from rlhpo.actions import ActionCodec
from rlhpo.env import HPOEnv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--suite", default="default")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "env_speed.md"))
    args = ap.parse_args()
    env = HPOEnv(args.suite, split="all", timing=True)
    rows = []
    for name in env.task_names:
        env.reset(seed=0, options={"task": name})  # warm the data cache
        episodes, steps = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            env.reset(seed=r, options={"task": name, "start": "default"})
            done, n = False, 0
            while not done:
                _, _, term, trunc, info = env.step(ActionCodec.NOOP)
                n += 1
                done = term or trunc
            dt = time.perf_counter() - t0
            episodes.append(dt)
            steps.append(dt / n)
        spec = env.tasks[name]
        split = "train" if name in env.suite.train else "test"
        rows.append(
            (
                name,
                split,
                spec.model,
                spec.budget_samples,
                spec.intervals,
                statistics.median(steps),
                statistics.median(episodes),
            )
        )
        print(
            f"{name:20s} {statistics.median(steps):7.3f} s/step {statistics.median(episodes):7.2f} s/episode",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Environment speed",
        "",
        f"Command: `python experiments/env_speed.py --suite {args.suite} --repeats {args.repeats}`  ",
        f"Machine: {platform.processor() or platform.machine()}, 2 cores, torch 1 thread, no GPU.  ",
        "Median over repeats; default hyperparameters, no-op actions, full default budget "
        "(includes model building and the first evaluation at reset).",
        "",
        "| task | split | model | budget (samples) | intervals | s / step | s / episode |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, split, model, budget, iv, s_step, s_ep in rows:
        lines.append(
            f"| {name} | {split} | {model} | {budget} | {iv} | {s_step:.3f} | {s_ep:.2f} |"
        )
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
