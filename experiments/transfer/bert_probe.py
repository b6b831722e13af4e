"""Policies on BERT runs outside the test split (issue #22, session 9).

The default suite's train split has no family like the test split's bert-counting: an
attention model whose tuned peak is too high, so that raising the lr (what policy v4
learned) sinks it. ``experiments/transfer/suites/default-bert.toml`` adds one (family
``bert``, 4 train instances) and ``bert-val.toml`` draws 4 more, never trained on.
This runs each policy on a family's instances, full budget, start default, the
Controller's rollback (what a user's loop does), eval seeds 0-2: final normalised
validation score. The test split is not used.

    python experiments/transfer/bert_probe.py --jobs 2 \
        --suite experiments/transfer/suites/bert-val.toml --family bertval \
        --policy prior=keep v4=default v3-vine=v3-vine rescue=rescue \
        --out experiments/transfer/bert_probe_val
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

FIELDS = ["policy", "family", "task", "seed", "final", "moves", "decisions", "seconds"]
_ENV: dict = {}


class _Keep:
    """The prior: "keep" at every decision (the tuned schedule with the guard)."""

    def __init__(self, noop):
        self.noop = noop

    def act(self, obs):
        return self.noop


def _policy(ref: str):
    if ref == "keep":
        from rlhpo.actions import noop_of
        from rlhpo.knobs import KNOBS

        return _Keep(noop_of(KNOBS))
    if ref == "rescue":
        from rlhpo.baselines.rescue import rescue_rule

        return rescue_rule()
    from rlhpo.policy import load_policy

    return load_policy(ref)


def run_one(job: tuple[str, str, str, str, int]) -> dict:
    name, ref, suite, task, seed = job
    import torch

    torch.set_num_threads(1)
    from rlhpo.agents import load_settings
    from rlhpo.env import EnvConfig, HPOEnv

    if suite not in _ENV:
        cfg = load_settings("vine").env_config(suite)
        _ENV[suite] = HPOEnv(EnvConfig.of(cfg, budget_scale=1.0, timing=False, rollback=True))
    env = _ENV[suite]
    pol = _policy(ref)
    t0 = time.perf_counter()
    obs, info = env.reset(seed=seed, options={"task": task, "start": "default"})
    done, moves, decisions = False, 0, 0
    while not done:
        a = pol.act(obs)
        decisions += 1
        moves += tuple(int(v) for v in a) != tuple(env.codec.noop)
        obs, _, term, trunc, info = env.step(a)
        done = term or trunc
    return {
        "policy": name,
        "task": task,
        "seed": seed,
        "final": round(float(info["val_norm_score"]), 4),
        "moves": moves,
        "decisions": decisions,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def report(rows: list[dict], names: list[str], title: str) -> str:
    """Mean final score per task (per family when there are more than 6 tasks)."""
    col = "task" if len({r["task"] for r in rows}) <= 6 else "family"
    tasks = sorted({r[col] for r in rows})
    cell = defaultdict(list)
    moved = defaultdict(lambda: [0, 0])
    for r in rows:
        cell[(r["policy"], r[col])].append(float(r["final"]))
        moved[r["policy"]][0] += int(r["moves"])
        moved[r["policy"]][1] += int(r["decisions"])
    lines = [
        f"# {title}",
        "",
        "| policy | " + " | ".join(tasks) + " | mean | decisions off keep |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for n in names:
        means = [statistics.fmean(cell[(n, t)]) for t in tasks]
        lines.append(
            f"| {n} | "
            + " | ".join(f"{m:.3f}" for m in means)
            + f" | {statistics.fmean(means):.3f} | {moved[n][0]}/{moved[n][1]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", required=True)
    ap.add_argument(
        "--family", nargs="+", required=True, help="the train families whose instances run"
    )
    ap.add_argument("--policy", nargs="+", required=True, metavar="NAME=REF")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="folder: results.csv, README.md")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    pols = []
    for text in a.policy:
        name, sep, ref = text.partition("=")
        if not sep or not name or not ref:
            raise SystemExit(
                f"--policy must be NAME=REF (keep, rescue, a policy name or folder), got {text!r}"
            )
        pol = _policy(ref)  # a bad policy fails here, before any run
        version = getattr(pol, "obs_version", 3)
        if version != 3:
            raise SystemExit(f"--policy {text}: reads observation v{version}; this env gives v3")
        pols.append((name, ref))
    from rlhpo.tasks import load_suite

    family = {s.name: s.family for s in load_suite(a.suite).split("train") if s.family in a.family}
    tasks = list(family)
    if not tasks:
        raise SystemExit(f"--family {a.family} has no train instances in {a.suite}")
    seeds = [int(s) for s in a.seeds.split(",")]
    jobs = [(n, ref, a.suite, t, s) for n, ref in pols for t in tasks for s in seeds]
    with ProcessPoolExecutor(a.jobs) as ex:
        rows = [r | {"family": family[r["task"]]} for r in ex.map(run_one, jobs)]
    a.out.mkdir(parents=True, exist_ok=True)
    with (a.out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    cmd = "python experiments/transfer/bert_probe.py " + " ".join(
        [f"--suite {a.suite}", "--family", *a.family, "--policy", *a.policy, f"--out {a.out}"]
    )
    text = report(
        rows,
        [n for n, _ in pols],
        f"Policies on the {', '.join(f'`{f}`' for f in a.family)} instances of `{a.suite}`",
    )
    text += (
        f"\n`{cmd}`. Final normalised validation score, mean over eval seeds "
        f"{a.seeds}; full budget, start default, the Controller's rollback. The test "
        "split is not used.\n"
    )
    (a.out / "README.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
