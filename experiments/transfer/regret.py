"""Regret of the prior on every train instance (issue #22).

The prior is the shipped default: the tuned warm-up + cosine schedule (residual
"keep") with the do-no-harm guard. For every train-split instance of the default
suite, this runs the same schedule with its peak scaled by each factor of a small
grid (``lr_scale=(c, c)``: the hidden factor on the level) and records the final
normalised validation score. Regret = best of the grid minus the prior (c = 1).
Runs are half-budget training episodes (``budget_scale 0.5``), the conditions the
policy is trained in; the suite's test split is never touched.

    python experiments/transfer/regret.py --jobs 2
    # -> experiments/transfer/regret.csv (one row per run) and regret.md

Resumable: rows already in the CSV are skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
GRID = (1 / 16, 1 / 4, 1.0, 4.0)
CURRICULUM = HERE.parent.parent / "rlhpo" / "recipes" / "regret-default.json"
FIELDS = ["task", "family", "scale", "seed", "final", "best", "curve", "seconds"]


def run_one(
    task: str, scale: float, seed: int, budget_scale: float, suite: str = "default"
) -> dict:
    import torch

    torch.set_num_threads(1)
    from rlhpo.agents import load_settings
    from rlhpo.env import EnvConfig, HPOEnv
    from rlhpo.tasks import load_suite

    # The recipe's env (residual over the tuned schedule, observation v2, the guard),
    # with the hidden lr factor pinned to the grid point.
    cfg = load_settings("ppo").env_config(suite)
    env = HPOEnv(
        EnvConfig.of(cfg, budget_scale=budget_scale, lr_scale=(scale, scale), timing=False)
    )
    t0 = time.perf_counter()
    obs, info = env.reset(seed=seed, options={"task": task, "start": "default"})
    curve = [info["val_norm_score"]]
    done = False
    while not done:
        obs, _, term, trunc, info = env.step(env.codec.noop)
        curve.append(info["val_norm_score"])
        done = term or trunc
    fam = load_suite(suite).task(task).family
    return {
        "task": task,
        "family": fam,
        "scale": scale,
        "seed": seed,
        "final": round(curve[-1], 4),
        "best": round(max(curve), 4),
        "curve": " ".join(f"{v:.3f}" for v in curve),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _done(path: Path) -> set[tuple[str, float, int]]:
    if not path.is_file():
        return set()
    with path.open() as f:
        return {(r["task"], float(r["scale"]), int(r["seed"])) for r in csv.DictReader(f)}


def regret_table(path: Path) -> tuple[list[dict], str]:
    """Per task: mean final score per scale, the best scale, and the regret."""
    from collections import defaultdict
    from statistics import fmean

    rows = list(csv.DictReader(path.open()))
    by: dict[tuple[str, float], list[float]] = defaultdict(list)
    fam = {}
    for r in rows:
        by[(r["task"], float(r["scale"]))].append(float(r["final"]))
        fam[r["task"]] = r["family"]
    tasks = sorted({t for t, _ in by})
    scales = sorted({s for _, s in by})
    out = []
    for t in tasks:
        m = {s: fmean(by[(t, s)]) for s in scales if (t, s) in by}
        if 1.0 not in m:
            continue
        best = max(m, key=m.get)
        out.append(
            {
                "task": t,
                "family": fam[t],
                "means": m,
                "best_scale": best,
                "regret": m[best] - m[1.0],
            }
        )
    head = "| task | family | " + " | ".join(f"x{s:g}" for s in scales) + " | best | regret |"
    lines = [head, "|" + "---|" * (len(scales) + 4)]
    for o in sorted(out, key=lambda o: -o["regret"]):
        cells = " | ".join(f"{o['means'].get(s, float('nan')):.3f}" for s in scales)
        lines.append(
            f"| {o['task']} | {o['family']} | {cells} | x{o['best_scale']:g} | {o['regret']:.3f} |"
        )
    return out, "\n".join(lines)


def curriculum_rows(path: Path, train_range: tuple[float, float] = (0.25, 4.0)) -> list[dict]:
    """Per (task, lr factor) inside the training range: the prior's regret there, the
    best mean score over the whole grid minus the mean score at that factor. The
    vine agent's curriculum (``rlhpo/recipes/regret-default.json``)."""
    from collections import defaultdict
    from statistics import fmean

    by: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in csv.DictReader(path.open()):
        by[(r["task"], float(r["scale"]))].append(float(r["final"]))
    means = {k: fmean(v) for k, v in by.items()}
    best: dict[str, float] = defaultdict(lambda: -math.inf)
    for (t, _), m in means.items():
        best[t] = max(best[t], m)
    lo, hi = train_range
    return [
        {"task": t, "lr_scale": c, "regret": round(best[t] - m, 4)}
        for (t, c), m in sorted(means.items())
        if lo <= c <= hi
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--budget-scale", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=HERE / "regret.csv")
    ap.add_argument("--report", action="store_true", help="only rewrite regret.md")
    ap.add_argument("--suite", default="default", help="a suite name or TOML (its train split)")
    ap.add_argument(
        "--curriculum",
        type=Path,
        default=None,
        help="where the curriculum JSON goes (default: the vine recipe's "
        "rlhpo/recipes/regret-default.json for the default --out, else beside --out, so "
        "that a measurement elsewhere never changes the shipped recipe)",
    )
    a = ap.parse_args()
    default_out = a.out.resolve() == (HERE / "regret.csv").resolve()
    if a.suite != "default" and default_out:
        raise SystemExit(
            f"--suite {a.suite} needs its own --out (regret.csv is the default suite's)"
        )
    curriculum = a.curriculum or (
        CURRICULUM if default_out else a.out.with_name(a.out.stem + "-curriculum.json")
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not a.report:
        from rlhpo.tasks import load_suite

        tasks = [s.name for s in load_suite(a.suite).split("train")]
        seeds = [int(s) for s in a.seeds.split(",")]
        done = _done(a.out)
        todo = [(t, c, s) for t in tasks for c in GRID for s in seeds if (t, c, s) not in done]
        new = not a.out.is_file()
        t0 = time.time()
        with a.out.open("a", newline="") as f, ProcessPoolExecutor(a.jobs) as ex:
            w = csv.DictWriter(f, FIELDS)
            if new:
                w.writeheader()
            futs = [ex.submit(run_one, t, c, s, a.budget_scale, a.suite) for t, c, s in todo]
            for i, fu in enumerate(futs):
                w.writerow(fu.result())
                f.flush()
                print(f"{i + 1}/{len(futs)} {time.time() - t0:.0f}s", flush=True)
    _, table = regret_table(a.out)
    rows = curriculum_rows(a.out)
    cmd = (
        "python experiments/transfer/regret.py --jobs 2"
        + ("" if a.suite == "default" else f" --suite {a.suite}")
        + ("" if default_out else f" --out {a.out}")
    )
    curriculum.write_text(
        json.dumps(
            {
                "source": f"{cmd} ({a.out.name})",
                "meaning": "regret of the prior (tuned warm-up + cosine, guard on, half budget, start "
                "default) per train task and hidden lr factor: best mean final normalised "
                "validation score over the factor grid minus the mean at this factor",
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    (a.out.with_suffix(".md")).write_text(
        "# Regret of the prior on the train split (issue #22)\n\n"
        f"`{cmd}`. Final normalised validation score of the tuned warm-up + cosine "
        "schedule with the guard (the shipped prior) with its peak scaled by each factor "
        "(mean over seeds; half-budget training episodes, start default). Regret = best "
        "scale minus x1.\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
