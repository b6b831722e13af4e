"""Can one move rescue a stuck run, or does it take a restart? (issue #22)

The vine branch data (``rlhpo train --agent vine``) say that on the train split a
single lr move (x1/4 ... x4, then the prior to the end) rarely rescues a run that is
still at chance: "keep" has the best mean advantage in every stuck bin. This probe
measures the alternative the issue names, a restart from the initial weights, on the
same kind of state, with common random numbers:

- every train-split task of the default suite, its prior (the vine recipe's env:
  tuned warm-up + cosine, guard, rollback) at a pinned lr factor of 1/4 and 4 (a peak
  4x too low or too high), half budget, seeds 0-1;
- at the first decision past ``--at`` of the budget, if the run has spent at least
  half of that at chance (observation v3's AT_CHANCE feature), the state is saved and
  each arm is run from it to the end, the prior deciding ("keep") after it:
  ``keep``; ``x4`` / ``x1/4`` (one lr move of the action space, under the guard's lr
  cap if a collapse set one); ``x4 uncapped`` (the same move with the cap lifted);
  ``restart x1`` / ``restart x4`` / ``restart x1/4`` (the initial weights and a fresh
  optimizer, no cap, then the lr level times the factor; the data order and the
  budget go on).

    python experiments/transfer/restart_probe.py --jobs 2     # writes restart_probe.md

The test split is not used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = ("keep", "x1/4", "x4", "x4 uncapped", "restart x1/4", "restart x1", "restart x4")
FACTORS = (0.25, 4.0)
SEEDS = (0, 1)


def _env():
    import torch

    from rlhpo.agents import load_settings
    from rlhpo.env import EnvConfig, HPOEnv

    torch.set_num_threads(1)
    cfg = load_settings("vine").env_config("default")
    return HPOEnv(EnvConfig.of(cfg, budget_scale=0.5, lr_scale=(1.0, 1.0), rollback=True))


def probe(job: tuple[str, float, int, float]) -> dict:
    from rlhpo.observation import ObservationEncoderV3

    task, c, seed, at = job
    env = _env()
    t0 = time.perf_counter()
    obs, info = env.reset(seed=seed, options={"task": task, "start": "default", "lr_scale": c})
    init = env.save_state()
    keep = env.codec.noop
    done = False
    while not done and info["samples"] / info["budget_samples"] < at:
        obs, _, term, trunc, info = env.step(keep)
        done = term or trunc
    frac = info["samples"] / info["budget_samples"]
    stuck = float(obs[ObservationEncoderV3.AT_CHANCE])
    row = {"task": task, "lr_factor": c, "seed": seed, "frac": round(frac, 3), "stuck": stuck}
    row["capped"] = env._lr_cap is not None
    if done or stuck < frac / 2:
        return {**row, "probed": False}
    state = env.save_state()
    finals = {}
    for arm in ARMS:
        env.load_state(state)
        action = keep
        if arm.startswith("restart"):
            # The initial weights and optimizer state; the data order and budget go on.
            env.trainee.restore(init["trainee"], data=False)
            env._best, env._lr_cap = None, None  # the guard's best and cap were the stuck run's
        if arm == "x4 uncapped":
            env._lr_cap = None
        factor = {"x1/4": 0.25, "x4": 4.0, "x1": 1.0}.get(
            arm.split()[-1 if "restart" in arm else 0]
        )
        if arm in ("x1/4", "x4", "x4 uncapped"):
            action = list(keep)
            action[0] = 0 if factor < 1 else 4  # the codec's lr moves: x1/4 ... x4
        elif arm.startswith("restart"):
            env._level = env._level * factor
        d = False
        while not d:
            _, _, term, trunc, inf = env.step(action)
            action = keep
            d = term or trunc
        finals[arm] = round(float(inf["val_norm_score"]), 4)
    return {**row, "probed": True, "final": finals, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--at", type=float, default=0.25, help="budget fraction of the probe")
    a = ap.parse_args()
    if not 0 < a.at < 1:
        raise SystemExit(f"--at must be a budget fraction in (0, 1), got {a.at}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from rlhpo.tasks import load_suite

    suite = load_suite("default")
    jobs = [(t.name, c, s, a.at) for t in suite.split("train") for c in FACTORS for s in SEEDS]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.jobs) as ex:
        rows = list(ex.map(probe, jobs))
    wall = time.perf_counter() - t0
    (HERE / "restart_probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    probed = [r for r in rows if r["probed"]]
    lines = [
        "# Restart probe: one lr move or a restart, on runs stuck at chance (issue #22)",
        "",
        f"`python experiments/transfer/restart_probe.py --jobs {a.jobs} --at {a.at}` "
        f"({wall:.0f} s on {os.cpu_count()} cores). See the script's docstring for the "
        f"protocol. {len(probed)} of {len(rows)} runs (train split, lr factors "
        f"{', '.join(f'x{c:g}' for c in FACTORS)}, seeds {', '.join(map(str, SEEDS))}) "
        f"were stuck at chance at {a.at:.0%} of the budget; their final normalised "
        "validation scores:",
        "",
        "| task | lr factor | seed | guard cap set | " + " | ".join(ARMS) + " |",
        "|---|---|---|---|" + "---|" * len(ARMS),
    ]
    for r in sorted(probed, key=lambda r: (r["task"], r["lr_factor"], r["seed"])):
        lines.append(
            f"| {r['task']} | x{r['lr_factor']:g} | {r['seed']} | "
            f"{'yes' if r['capped'] else 'no'} | "
            + " | ".join(f"{r['final'][x]:.3f}" for x in ARMS)
            + " |"
        )
    if probed:
        lines.append(
            "| **mean** | | | | "
            + " | ".join(f"**{statistics.fmean(r['final'][x] for r in probed):.3f}**" for x in ARMS)
            + " |"
        )
        for c in FACTORS:
            sub = [r for r in probed if r["lr_factor"] == c]
            if sub:
                lines.append(
                    f"| mean at x{c:g} ({len(sub)} runs) | | | | "
                    + " | ".join(
                        f"{statistics.fmean(r['final'][x] for r in sub):.3f}" for x in ARMS
                    )
                    + " |"
                )
    (HERE / "restart_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
