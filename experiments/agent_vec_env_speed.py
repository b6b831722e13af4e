"""Measure env steps/s for PPO's vectorised envs: DummyVecEnv vs SubprocVecEnv.

Random actions on the default suite's train split (random starts, full budget),
the same seeds for both kinds, repetitions interleaved. Subprocess workers use
one torch thread (make_vec_env's subprocess workers call limit_threads(); this
script calls it for its own process).

    python experiments/agent_vec_env_speed.py --steps 400 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def measure(kind: str, n_envs: int, steps: int, seed: int) -> float:
    import numpy as np

    from rlhpo.agents.envs import make_vec_env
    from rlhpo.runtime import limit_threads

    limit_threads()  # the script's process, as the CLI does for its own
    venv = make_vec_env(suite="default-v1", split="train", n_envs=n_envs, seed=seed, backend=kind)
    rng = np.random.default_rng(seed)
    venv.reset()
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        acts = rng.integers(0, [5, 3, 3], size=(n_envs, 3))
        venv.step(acts)
        done += n_envs
    dt = time.perf_counter() - t0
    venv.close()
    return done / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n-envs", type=int, nargs="+", default=[2])
    ap.add_argument("--out", default="experiments/results/agent_vec_env_speed.md")
    a = ap.parse_args()
    res: dict[tuple[str, int], list[float]] = {}
    for r in range(a.repeats):
        for n in a.n_envs:
            for kind in ("dummy", "subproc"):
                sps = measure(kind, n, a.steps, seed=r)
                res.setdefault((kind, n), []).append(sps)
                print(f"repeat {r} {kind} n_envs={n}: {sps:.1f} env steps/s", flush=True)
    lines = [
        "# Vectorised env speed for PPO: DummyVecEnv vs SubprocVecEnv",
        "",
        f"Command: `python experiments/agent_vec_env_speed.py --steps {a.steps} --repeats {a.repeats} "
        f"--n-envs {' '.join(map(str, a.n_envs))}`  ",
        "Machine: 2 cores, SHARED with other jobs while measured (noisy); torch 1 thread "
        "per process. Default suite, train split, random starts, random actions, full budget.",
        "",
        "| vec env | n_envs | env steps/s (median) | runs |",
        "|---|---:|---:|---|",
    ]
    for (kind, n), v in res.items():
        lines.append(
            f"| {kind} | {n} | {statistics.median(v):.1f} | {', '.join(f'{x:.1f}' for x in v)} |"
        )
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
