"""Tune the peak learning rate of the warm-up + cosine baseline on the TRAIN split.

A small grid of peak learning rates; each is run on every train task of the suite
for a few seeds (seeds 100+, apart from the comparison's 0..4, though the tasks
differ anyway); the peak with the best mean normalised *validation* score wins.
No test split and no test task is touched. The result is committed data, read by
the ``warmup-cosine`` method of ``rlhpo compare``:

    python experiments/tune_warmup_cosine.py --suite default --seeds 3 --workers 2

writes ``rlhpo/baselines/calibrated/warmup_cosine.json`` (merged per suite) and
``experiments/results/warmup_cosine_tuning.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    from rlhpo.runtime import limit_threads

    limit_threads()


def _run(args: tuple[str, str, float, int]) -> tuple[str, float, int, float, float]:
    suite_name, task, peak, seed = args
    from rlhpo.baselines import run_single, schedule_for
    from rlhpo.env import run_seed_for
    from rlhpo.tasks import load_suite

    spec = load_suite(suite_name).task(task)
    hp = {**spec.default, "lr": peak}
    out = run_single(
        spec,
        hp,
        run_seed_for(seed),
        scheduler=schedule_for("warmup-cosine", spec, hp["batch_size"]),
        evaluate_test=False,
    )
    return task, peak, seed, out.val_norm, out.wall_time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="default")
    p.add_argument("--grid", default="0.0005,0.001,0.002,0.005,0.01,0.02,0.05")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--out", default=str(ROOT / "rlhpo" / "baselines" / "calibrated" / "warmup_cosine.json")
    )
    p.add_argument(
        "--table", default=str(ROOT / "experiments" / "results" / "warmup_cosine_tuning.md")
    )
    a = p.parse_args(argv)
    from rlhpo.baselines.schedules import optimizer_kind
    from rlhpo.tasks import load_suite

    suite = load_suite(a.suite)
    grid = [float(x) for x in a.grid.split(",")]
    seeds = [100 + i for i in range(a.seeds)]
    jobs = [(a.suite, t, peak, s) for peak in grid for t in suite.train for s in seeds]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.workers, mp_context=get_context("spawn"), initializer=_init) as ex:
        results = list(ex.map(_run, jobs))
    wall = time.perf_counter() - t0
    scores: dict[float, dict[str, list[float]]] = {g: {t: [] for t in suite.train} for g in grid}
    for task, peak, _seed, val, _wall in results:
        scores[peak][task].append(val)
    mean = {g: float(np.mean([v for vs in scores[g].values() for v in vs])) for g in grid}
    best = max(grid, key=lambda g: mean[g])
    # SGD (momentum 0.9) and the Adam family want different peaks: one per optimizer kind.
    kinds = {t: optimizer_kind(suite.task(t).optimizer) for t in suite.train}
    by_kind: dict[str, float] = {}
    mean_by_kind: dict[str, dict[float, float]] = {}
    for kind in sorted(set(kinds.values())):
        mk = {
            g: float(np.mean([v for t, vs in scores[g].items() if kinds[t] == kind for v in vs]))
            for g in grid
        }
        mean_by_kind[kind] = mk
        by_kind[kind] = max(grid, key=lambda g: mk[g])
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    entry = {
        "peak_lr": best,
        "peak_lr_by_optimizer": by_kind,
        "mean_norm_val_score_by_optimizer": {
            k: {str(g): round(v, 4) for g, v in mk.items()} for k, mk in mean_by_kind.items()
        },
        "split": "train",
        "tasks": list(suite.train),
        "seeds": seeds,
        "grid": grid,
        "mean_norm_val_score": {str(g): round(mean[g], 4) for g in grid},
        "per_task": {
            str(g): {t: round(float(np.mean(v)), 4) for t, v in scores[g].items()} for g in grid
        },
        "schedule": "linear warm-up over 10% of the steps from peak/25, then cosine to 0; "
        "batch size and dropout: the task default",
        "command": command,
        "wall_time_s": round(wall, 1),
        "created": time.strftime("%Y-%m-%d"),
    }
    out = Path(a.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("suites", {})[suite.name] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")

    lines = [
        f"# Warm-up + cosine: peak learning rate tuned on the `{suite.name}` train split",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, 1 torch thread per worker, "
        f"{a.workers} workers, shared with other work; wall time {wall:.0f} s.  ",
        f"Seeds {seeds}; score = final normalised validation score (0 chance, 1 perfect), "
        "mean over train tasks x seeds. The test split is not used.",
        "",
        "Chosen per optimizer kind (`peak_lr_by_optimizer`, what `warmup-cosine` uses): "
        + ", ".join(f"{k} {v:g}" for k, v in by_kind.items())
        + f"; over all tasks {best:g}. Task columns: (a) = Adam/AdamW, (s) = SGD.",
        "",
        "| peak lr | mean | "
        + " | ".join(f"mean {k}" for k in mean_by_kind)
        + " | "
        + " | ".join(f"{t} ({kinds[t][0]})" for t in suite.train)
        + " |",
        "|---:|---:|" + "---:|" * (len(mean_by_kind) + len(suite.train)),
    ]
    for g in grid:
        mark = " **(chosen)**" if g == best else ""
        row = [f"{g:g}{mark}", f"{mean[g]:.3f}"]
        row += [
            f"{mean_by_kind[k][g]:.3f}" + (" **(chosen)**" if by_kind[k] == g else "")
            for k in mean_by_kind
        ]
        row += [f"{np.mean(scores[g][t]):.3f}" for t in suite.train]
        lines.append("| " + " | ".join(row) + " |")
    Path(a.table).parent.mkdir(parents=True, exist_ok=True)
    Path(a.table).write_text("\n".join(lines) + "\n")
    print(f"chosen peak lr {best:g} (mean normalised val score {mean[best]:.3f}); {wall:.0f} s")
    print(f"wrote {out} and {a.table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
