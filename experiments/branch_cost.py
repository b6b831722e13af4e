"""What a branch rollout costs: K forks of one mid-run state, batched, vs one
unbatched continuation.

    python experiments/branch_cost.py [--tasks mlp-00-wine,...] [--k 5] [--repeats 3]
        [--fraction 0.5] [--budget-scale 1.0] [--profile gru,encoder]

For one task of each family (MLP, CNN, GRU, transformer encoder; by default the
first of each in the default suite's train split), a run with the task's
default hyperparameters is trained to ``--fraction`` of its budget. From that
state:

- ``batched``: :meth:`rlhpo.trainees.batched.BatchedRun.fork` makes K runs in
  the same group (same weights, optimizer state, data order), each gets its own
  learning rate (x 1/4, 1/2, 1, 2, 4 for K = 5, as the env's lr actions), and all
  K train the rest of the budget together, interval by interval, each interval
  followed by a validation pass (what an env step does);
- ``unbatched``: one :class:`rlhpo.trainees.Trainee` at the same state trains
  the rest of the budget the same way.

The ratio batched / unbatched is what K branches cost in units of one
continuation (K unbatched continuations would cost K). The machine is shared,
so the two are timed alternately in each of ``--repeats`` rounds and the median
of the per-round ratios is reported. Also reported: the bytes one snapshot of a
run takes (:meth:`BatchedRun.snapshot_bytes`) for every task of the train split,
per family.

``--profile FAMILIES`` also profiles one interval of the K forks and of the
unbatched run on those families' tasks (torch.profiler, operators by self CPU
time): where the batched GRU and transformer steps spend their time.

Writes experiments/results/branch_cost.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from rlhpo.runtime import limit_threads
from rlhpo.tasks import load_suite
from rlhpo.tasks.spec import TaskSpec
from rlhpo.trainees import build_trainee, task_data
from rlhpo.trainees.functional import make_batched_trainee

OUT = Path(__file__).parent / "results"
SUITE = "default"
FAMILIES = ("mlp", "cnn1d", "gru", "encoder")
# Goals of issue 24: K=5 branches at most this x one unbatched continuation.
GOAL = {"mlp": 2.0, "cnn1d": 2.0, "gru": 3.0, "encoder": 3.0}


def default_tasks(suite) -> list[str]:
    """The first task of each family in ``FAMILIES`` in the suite's train split."""
    first: dict[str, str] = {}
    for t in suite.split("train"):
        first.setdefault(t.model, t.name)
    missing = [f for f in FAMILIES if f not in first]
    if missing:
        raise ValueError(f"the train split has no task of families {missing}")
    return [first[f] for f in FAMILIES]


def lr_factors(k: int) -> list[float]:
    """K learning-rate factors spread over x 1/4 .. x 4 (the env's lr actions for K=5)."""
    if k == 1:
        return [1.0]
    return [4.0 ** (-1 + 2 * i / (k - 1)) for i in range(k)]


def _intervals(spec: TaskSpec, start: int) -> list[int]:
    """Samples per interval from ``start`` to the end of the budget."""
    out, seen = [], start
    while seen < spec.budget_samples:
        n = min(spec.interval_samples, spec.budget_samples - seen)
        out.append(n)
        seen += n
    return out


def mid_state(spec: TaskSpec, fraction: float, seed: int):
    """A batched run and a Trainee of ``spec``, both trained to ``fraction`` of its budget."""
    group = make_batched_trainee(spec)
    run = group.add(seed=seed)
    tr = build_trainee(spec, seed=seed)
    n = int(round(spec.budget_samples * fraction / spec.interval_samples)) * spec.interval_samples
    for x in (run, tr):
        for m in _intervals(spec, 0)[: n // spec.interval_samples]:
            x.train(m)
    return run, tr


def time_batched(run, k: int, spec: TaskSpec) -> float:
    t0 = time.perf_counter()
    forks = run.fork(k)
    for f, c in zip(forks, lr_factors(k), strict=True):
        f.set_hp(lr=run.lr * c)
    group = run.group
    for n in _intervals(spec, run.samples_seen):
        group.train([(f, n) for f in forks])
        group.evaluate(forks)
    dt = time.perf_counter() - t0
    for f in forks:
        f.release()
    return dt


def time_unbatched(tr, snap, spec: TaskSpec) -> float:
    t0 = time.perf_counter()
    start = tr.samples_seen
    for n in _intervals(spec, start):
        tr.train(n)
        tr.evaluate()
    dt = time.perf_counter() - t0
    # back to the mid-run state for the next round (not timed)
    tr.restore(snap)
    tr.samples_seen = start
    return dt


def measure(spec: TaskSpec, k: int, repeats: int, fraction: float, seed: int) -> dict:
    run, tr = mid_state(spec, fraction, seed)
    snap = tr.snapshot()
    rounds = []
    for r in range(repeats):
        # alternate which goes first, so a load change mid-round hits both alike
        if r % 2 == 0:
            b, u = time_batched(run, k, spec), time_unbatched(tr, snap, spec)
        else:
            u, b = time_unbatched(tr, snap, spec), time_batched(run, k, spec)
        rounds.append((b, u, os.getloadavg()[0]))
        print(
            f"{spec.name:24s} round {r}: batched K={k} {b:7.2f} s, unbatched {u:7.2f} s, "
            f"ratio {b / u:.2f}, load {rounds[-1][2]:.1f}",
            flush=True,
        )
    return {
        "task": spec.name,
        "family": spec.model,
        "samples": spec.budget_samples - run.samples_seen,
        "intervals": len(_intervals(spec, run.samples_seen)),
        "batched_s": statistics.median(b for b, _, _ in rounds),
        "unbatched_s": statistics.median(u for _, u, _ in rounds),
        "ratio": statistics.median(b / u for b, u, _ in rounds),
        "ratios": [b / u for b, u, _ in rounds],
        "load": statistics.median(ld for *_, ld in rounds),
        "snapshot_bytes": run.snapshot_bytes(),
    }


def profile_family(spec: TaskSpec, k: int, fraction: float, seed: int, rows: int = 12):
    """Top operators by self CPU time of one interval: K forks batched, one run unbatched."""
    from torch.profiler import ProfilerActivity, profile

    run, tr = mid_state(spec, fraction, seed)
    forks = run.fork(k)
    n = spec.interval_samples
    out = {}
    for name, fn in (
        (f"batched, {k} forks", lambda: run.group.train([(f, n) for f in forks])),
        ("unbatched, 1 run", lambda: tr.train(n)),
    ):
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out[name] = (
            total,
            [(e.key, e.self_cpu_time_total, e.count) for e in events[:rows]],
        )
    return out


def snapshot_sizes(suite) -> dict[str, list[tuple[str, int]]]:
    """(task, bytes of one run's snapshot) of every train task, by family."""
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for spec in suite.split("train"):
        out[spec.model].append((spec.name, make_batched_trainee(spec).add().snapshot_bytes()))
    return out


def write(rows, sizes, args, cmd: str, load, profiles=None) -> Path:
    lines = [
        "# Branch cost: K forks of one mid-run state, batched, vs one unbatched continuation",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work "
        f"(load average {load[0]:.1f} at start, {load[1]:.1f} at end), torch "
        f"{torch.__version__}, 1 torch thread, no GPU.  ",
        f"Each task: a run with the task's default hyperparameters trained to "
        f"{args.fraction:g} of its budget; from there K={args.k} forks (lr x "
        f"{', '.join(f'{c:g}' for c in lr_factors(args.k))}) train the rest of the budget "
        "together in one batched group (fast mode), interval by interval with a "
        "validation pass after each, vs one unbatched Trainee doing the same. Timed "
        f"alternately, {args.repeats} rounds; medians. Ratio = batched time / unbatched time "
        f"(K unbatched continuations would be {args.k}x). Goal (issue 24): <= 2x on MLP/CNN, "
        "<= 3x on GRU/transformer.",
        "",
        "| task | family | samples left | intervals | batched K s | unbatched s | ratio "
        "| per-round ratios | goal | snapshot KiB/run | load |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        goal = GOAL.get(r["family"])
        met = (
            "" if goal is None else (f"<= {goal:g}x " + ("met" if r["ratio"] <= goal else "MISSED"))
        )
        lines.append(
            f"| {r['task']} | {r['family']} | {r['samples']:,} | {r['intervals']} | "
            f"{r['batched_s']:.2f} | {r['unbatched_s']:.2f} | {r['ratio']:.2f}x | "
            f"{', '.join(f'{x:.2f}' for x in r['ratios'])} | {met} | "
            f"{r['snapshot_bytes'] / 1024:.0f} | {r['load']:.1f} |"
        )
    lines += [
        "",
        "## Snapshot memory per run, by family (every train task of the suite)",
        "",
        "One `BatchedRun.snapshot()`: weights, optimizer state (Adam: two moments; SGD: "
        "momentum), the data order's permutation and generator state, the dropout "
        "stream's state. The collapse guard holds one or two per run; a group's live "
        "snapshots are capped by `snapshot_cap_bytes` (default 1 GiB).",
        "",
        "| family | tasks | min KiB | mean KiB | max KiB | runs per 1 GiB cap (max) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for fam, items in sorted(sizes.items()):
        kib = [b / 1024 for _, b in items]
        lines.append(
            f"| {fam} | {len(items)} | {min(kib):.0f} | {statistics.mean(kib):.0f} | "
            f"{max(kib):.0f} | {int(2**30 // max(b for _, b in items)):,} |"
        )
    for task, prof in (profiles or {}).items():
        lines += ["", f"## Profile: one interval of {task}", ""]
        for name, (total, top) in prof.items():
            lines += [
                f"{name}: {total / 1e3:.1f} ms self CPU in all.",
                "",
                "| operator | self CPU ms | share | calls |",
                "|---|---:|---:|---:|",
            ]
            lines += [
                f"| `{key[:60]}` | {us / 1e3:.1f} | {100 * us / total:.0f}% | {count} |"
                for key, us, count in top
            ]
            lines.append("")
    path = OUT / "branch_cost.md"
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", default="", help="comma-separated (default: one per family)")
    ap.add_argument("--k", type=int, default=5, help="forks per branch point")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.5, help="budget used at the fork")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="scale every task's budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="", help="families whose K-fork interval to profile")
    args = ap.parse_args()
    if args.k < 1:
        raise SystemExit(f"--k must be >= 1, got {args.k}")
    if not 0 < args.fraction < 1:
        raise SystemExit(f"--fraction must be in (0, 1), got {args.fraction}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    limit_threads()
    suite = load_suite(SUITE)
    names = [t for t in args.tasks.split(",") if t] or default_tasks(suite)
    specs = [suite.task(t) for t in names]
    if args.budget_scale != 1.0:
        specs = [s.scaled(args.budget_scale) for s in specs]
    for s in specs:
        task_data(s)  # datasets built before any timing
    to_profile = []
    for fam in [f for f in args.profile.split(",") if f]:
        spec = next((s for s in specs if s.model == fam), None)
        if spec is None:
            raise SystemExit(f"--profile: no measured task of family {fam!r}")
        to_profile.append(spec)
    load0 = os.getloadavg()[0]
    rows = [measure(s, args.k, args.repeats, args.fraction, args.seed) for s in specs]
    sizes = snapshot_sizes(suite)
    profiles = {s.name: profile_family(s, args.k, args.fraction, args.seed) for s in to_profile}
    cmd = "python experiments/branch_cost.py " + " ".join(sys.argv[1:])
    path = write(rows, sizes, args, cmd.strip(), (load0, os.getloadavg()[0]), profiles)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
