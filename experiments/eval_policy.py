"""Evaluate tuning policies against a random policy and "do nothing" on a suite's TRAIN split.

Every episode starts from the env's randomised start (learning rate log-uniform
over the task's start range, so bad starts like 1e-5 are included; batch size and
dropout drawn too). Each (task, seed) start is the same for every method: the env
is reset with the same seed, which fixes the start, the model initialisation and
the data order; every task gets its own ``--seeds`` starts (env seed
100000 + 1000 * task index + seed). Metrics per episode: final normalised validation score (0 chance,
1 perfect; a diverged run counts 0), return (reward includes the compute charge),
optimizer steps / steps at the task's default batch size, training wall time.
Test splits are not touched.

    python experiments/eval_policy.py --policy default=rlhpo/policies/default \
        --seeds 6 --out experiments/results/eval_default_policy.md
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from rlhpo.actions import ActionCodec  # noqa: E402
from rlhpo.env import HPOEnv  # noqa: E402
from rlhpo.knobs import KNOBS  # noqa: E402
from rlhpo.policy import load_policy  # noqa: E402
from rlhpo.tasks import load_suite  # noqa: E402

SEED_BASE = 100_000  # far from the seeds training resets used (seed + env index)


def episode_seed(task_index: int, seed: int) -> int:
    """A distinct env seed per (task, seed): each task gets its own random starts."""
    return SEED_BASE + 1000 * task_index + seed


def run_episode(env: HPOEnv, task: str, env_seed: int, method: str, policy=None) -> dict:
    obs, info = env.reset(seed=env_seed, options={"task": task})
    start_lr = info["hp"]["lr"]
    rng = np.random.default_rng(env_seed)
    ret, done = 0.0, False
    while not done:
        if method == "noop":
            action = np.asarray(ActionCodec.NOOP)
        elif method == "random":
            action = rng.integers(0, ActionCodec.NVEC)
        else:
            action = np.array(policy.act(obs, deterministic=True))
            for k in policy.freeze:  # knobs the policy was trained not to move
                action[KNOBS.index(k)] = ActionCodec.NOOP[KNOBS.index(k)]
        obs, r, term, trunc, info = env.step(action)
        ret += r
        done = term or trunc
    return {
        "task": task,
        "seed": env_seed,
        "method": method,
        "start_lr": start_lr,
        "final_score": float(info["val_norm_score"]),
        "return": ret,
        "steps_ratio": info["optimizer_steps"] / max(info["static_steps"], 1),
        "wall_time": float(info["wall_time"]),
        "diverged": bool(info["diverged"]),
        "final_lr": info["hp"]["lr"],
        "final_batch": info["hp"]["batch_size"],
    }


def bootstrap_ci(x: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = rng.choice(x, size=(n, len(x)), replace=True).mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", action="append", required=True, help="NAME=DIR (repeatable)")
    ap.add_argument("--suite", default="default-v1")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--budget-scale", type=float, default=1.0)
    ap.add_argument("--tasks", nargs="*", default=None, help="subset of the train split")
    ap.add_argument("--out", default="experiments/results/eval_default_policy.md")
    a = ap.parse_args()

    suite = load_suite(a.suite)
    tasks = a.tasks or list(suite.train)
    bad = [t for t in tasks if t not in suite.train]
    if bad:
        raise SystemExit(f"--tasks must be in the {a.suite} suite's train split, got {bad}")
    policies = {}
    for spec in a.policy:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--policy takes NAME=DIR, got {spec!r}")
        policies[name] = load_policy(path)
    # Returns are only comparable under the charge the policies were trained with.
    penalties = {p.manifest.get("env", {}).get("compute_penalty", 0.1) for p in policies.values()}
    if len(penalties) != 1:
        raise SystemExit(f"policies were trained with different compute penalties {penalties}")
    penalty = penalties.pop()
    methods = [*policies, "random", "noop"]
    t0 = time.time()
    rows = []
    for ti, task in enumerate(tasks):
        env = HPOEnv(
            suite,
            split="train",
            tasks=[task],
            budget_scale=a.budget_scale,
            compute_penalty=penalty,
            timing=True,
        )
        for seed in range(a.seeds):
            for m in methods:
                rows.append(run_episode(env, task, episode_seed(ti, seed), m, policies.get(m)))
        print(f"{task}: done ({time.time() - t0:.0f} s)", flush=True)

    by = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    lines = [
        "# Tuning policies vs random vs do-nothing (train split, random starts)",
        "",
        "Command: `python experiments/eval_policy.py "
        + " ".join(f"--policy {s}" for s in a.policy)
        + f" --seeds {a.seeds}"
        + (f" --budget-scale {a.budget_scale}" if a.budget_scale != 1.0 else "")
        + (f" --tasks {' '.join(a.tasks)}" if a.tasks else "")
        + f" --out {a.out}`  ",
        f"Suite `{a.suite}`, TRAIN split only ({len(tasks)} tasks) x {a.seeds} seeds = "
        f"{len(tasks) * a.seeds} episodes per method; the same random start (each task's start "
        "distribution; in the default suite lr log-uniform 1e-5..3e-2, batch 32/64/128, dropout "
        "0..0.3), init and data order for every method. Policies act deterministically. "
        f"Compute charge {penalty} (as trained). "
        f"Machine: 2 cores shared with other jobs, 1 torch thread; {time.time() - t0:.0f} s.",
        "",
        "| method | final val score (norm.) | 95% CI | return | opt. steps / default | "
        "diverged | wall s / episode |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        rs = by[m]
        fs = np.array([r["final_score"] for r in rs])
        lo, hi = bootstrap_ci(fs)
        lines.append(
            f"| {m} | {fs.mean():.3f} | [{lo:.3f}, {hi:.3f}] | "
            f"{np.mean([r['return'] for r in rs]):+.3f} | "
            f"{np.mean([r['steps_ratio'] for r in rs]):.2f} | "
            f"{sum(r['diverged'] for r in rs)}/{len(rs)} | "
            f"{np.mean([r['wall_time'] for r in rs]):.2f} |"
        )
    # paired comparison: same (task, seed) start
    key = {(r["method"], r["task"], r["seed"]): r for r in rows}
    lines += ["", "Paired by start (same task and seed): policy minus baseline, final score.", ""]
    lines += [
        "| policy | vs | mean diff | 95% CI | wins / ties / losses |",
        "|---|---|---:|---:|---|",
    ]
    for p in policies:
        for b in ("random", "noop"):
            d = np.array(
                [
                    key[(p, t, episode_seed(ti, s))]["final_score"]
                    - key[(b, t, episode_seed(ti, s))]["final_score"]
                    for ti, t in enumerate(tasks)
                    for s in range(a.seeds)
                ]
            )
            lo, hi = bootstrap_ci(d)
            w, ties = int((d > 1e-9).sum()), int((np.abs(d) <= 1e-9).sum())
            lines.append(
                f"| {p} | {b} | {d.mean():+.3f} | [{lo:+.3f}, {hi:+.3f}] | "
                f"{w} / {ties} / {len(d) - w - ties} |"
            )
    # bad starts: lr below 1e-4
    lines += ["", "Starts with lr < 1e-4 (bad) vs the rest: mean final score.", ""]
    lines += ["| method | bad starts | other starts |", "|---|---:|---:|"]
    for m in methods:
        b_ = [r["final_score"] for r in by[m] if r["start_lr"] < 1e-4]
        o_ = [r["final_score"] for r in by[m] if r["start_lr"] >= 1e-4]
        lines.append(
            f"| {m} | {np.mean(b_) if b_ else float('nan'):.3f} (n={len(b_)}) | "
            f"{np.mean(o_) if o_ else float('nan'):.3f} (n={len(o_)}) |"
        )
    lines += ["", "Per task, mean final val score (norm.):", ""]
    lines += ["| task | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for ti, t in enumerate(tasks):
        cells = [
            f"{np.mean([key[(m, t, episode_seed(ti, s))]['final_score'] for s in range(a.seeds)]):.3f}"
            for m in methods
        ]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
