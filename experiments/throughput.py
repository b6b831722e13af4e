"""Throughput of the tuning environments: one model per env vs the batched backend.

    python experiments/throughput.py [--tasks mnist1d-mlp,mnist1d-cnn] [--ns 8,16,32,64]
        [--seconds 4] [--repeats 2] [--kernels] [--chunks]
    python experiments/throughput.py --ppo 2560
    python experiments/throughput.py --suite default --tasks train-split --guard 3 ...

For each task, environment steps per second (one step = one interval of training
of one env's model) and training samples per second of:

- ``dummy``: SB3 ``DummyVecEnv`` of ``HPOEnv`` (one model per env, one process);
- ``subproc``: SB3 ``SubprocVecEnv`` of 2 ``HPOEnv`` (one model and one process
  per env, so both cores);
- ``batched``: :class:`rlhpo.vec_env.BatchedVecEnv` with N = 8..64 envs in one
  process (default fast mode), and (``--ns2``) split over 2 worker processes
  (:class:`rlhpo.vec_env.ShardedVecEnv`), the same 2 cores ``subproc`` uses.

Every configuration runs the full-budget task from random starts with uniformly
random actions (so batch sizes drift over 16..256 as an untrained policy's do),
from the same seeds; one warm-up step is not timed. The machine is shared, so
all configurations of a task are stepped round-robin (one vector step each in
turn) until each has run ``--seconds``, and medians over ``--repeats`` rounds
are reported. Memory per model: weights + Adam state (what every backend keeps
per model), and the process memory (RSS) added per env, measured in a fresh
process per configuration (for ``subproc``: its worker processes).

``--kernels`` also times one training step of the MNIST-1D MLP per model for the
ways to batch it (torch.func vmap over functional_call, autograd over stacked
bmm, rlhpo's explicit backward): how the backend was chosen. ``--chunks`` times
the batched backend's chunk size.

``--guard K`` runs every configuration twice, with the collapse guard off and
on (``collapse_k=K``: each run snapshots its best state and restores it on a
collapse); the guard's cost is 1 - (steps/s on) / (steps/s off) of the same
configuration, and speedups are over one model per env with the same guard.
``--family-groups K`` instead times, for the first train task of every family of
``--suite``, one interval plus a validation pass of K runs batched in one group
vs K unbatched Trainees, with one batch size for all and with mixed batch sizes
(16, 64, 128, 256, ...; each batch size its own lockstep group), best of 3
(results/OUT_families.md).
``--runs-per-task G`` makes the batched envs train blocks of G slots on one task
at a time (``make_vec_env(runs_per_task=G)``).

Writes experiments/results/throughput.md and throughput.png. ``--ppo T`` instead
times SB3 PPO for T timesteps on the default train split with one-model-per-env
and batched vector envs (results/throughput_ppo.md).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from rlhpo.actions import ActionCodec
from rlhpo.runtime import limit_threads
from rlhpo.tasks import load_suite
from rlhpo.tasks.spec import TaskSpec
from rlhpo.trainees import build_trainee, task_data
from rlhpo.trainees.batched import CHUNK_ELEMENTS, BatchedTrainee, supports_batching
from rlhpo.trainees.functional import FunctionalTrainee, make_batched_trainee
from rlhpo.vec_env import make_vec_env

OUT = Path(__file__).parent / "results"


def _rss(pid: int | None = None) -> int:
    return psutil.Process(pid).memory_info().rss


CONFIGS_ONE = {"dummy": ("dummy", 2, 1), "subproc": ("subproc", 2, 2)}
# The collapse guard's k in configurations that run it (--guard).
COLLAPSE_K = 3.0
# Slots per task block of the batched envs (--runs-per-task).
RUNS_PER_TASK = 1


def configs(args) -> list[tuple[str, int, int, bool]]:
    """(backend, n_envs, processes, guard on) of every configuration."""
    plain = (
        [CONFIGS_ONE[b] for b in args.one]
        + [("batched", n, 1) for n in args.ns]
        + [("batched", n, 2) for n in args.ns2]
    )
    guards = (False, True) if args.guard else (False,)
    return [(*c, g) for c in plain for g in guards]


# The pseudo-task of the whole mixed train split of the default suite (every
# reset draws one of its tasks, as policy training does).
TRAIN_SPLIT = "train-split"
# The suite the env rounds draw their tasks from (--suite); the kernel, chunk and
# PPO timings keep the v1 suite's named tasks.
SUITE = "default-v1"


class _Stepper:
    """One vector env under test, stepped with seeded random actions."""

    def __init__(self, task: str, backend: str, n_envs: int, procs: int, guard: bool, seed: int):
        self.backend, self.n = backend, n_envs
        self.venv = make_vec_env(
            SUITE,
            "train" if task == TRAIN_SPLIT else "all",
            n_envs=n_envs,
            seed=seed,
            backend=backend,
            n_procs=procs if backend == "batched" else 1,
            monitor=False,
            tasks=None if task == TRAIN_SPLIT else [task],
            collapse_k=COLLAPSE_K if guard else None,
            runs_per_task=RUNS_PER_TASK if backend == "batched" else 1,
        )
        self.rng = np.random.default_rng(seed)
        self.last = np.zeros(n_envs, dtype=np.int64)
        self.time = 0.0
        self.steps = self.samples = self.collapses = 0
        self.venv.reset()
        self.step()  # warm-up: models built, data cached, workers started
        self.time = 0.0
        self.steps = self.samples = self.collapses = 0

    def step(self) -> None:
        a = self.rng.integers(0, ActionCodec.NVEC, size=(self.n, 3))
        t0 = time.perf_counter()
        _, _, dones, infos = self.venv.step(a)
        dt = time.perf_counter() - t0
        for i, info in enumerate(infos):
            self.samples += int(info["samples"]) - int(self.last[i])
            self.last[i] = 0 if dones[i] else info["samples"]
            self.collapses += "collapse" in info  # the guard restored a best state
        self.time += dt
        self.steps += self.n


def measure_task(task: str, confs: list[tuple], seconds: float, seed: int) -> dict:
    """Env steps/s and samples/s of every configuration of one task.

    All configurations exist at once and are stepped round-robin, one vector step
    each in turn, until each has run ``seconds``: load from other work on the
    shared machine then falls on all of them alike.
    """
    steppers = {c: _Stepper(task, *c, seed) for c in confs}
    while any(st.time < seconds or st.steps < 2 * st.n for st in steppers.values()):
        for st in steppers.values():
            if st.time < seconds or st.steps < 2 * st.n:
                st.step()
    out = {
        k: {
            "steps_s": st.steps / st.time,
            "samples_s": st.samples / st.time,
            "steps": st.steps,
            "collapses": st.collapses,
        }
        for k, st in steppers.items()
    }
    for st in steppers.values():
        st.venv.close()
    return out


def _memory_child(
    task: str, backend: str, n_envs: int, procs: int, guard: bool, settings: tuple, queue
) -> None:
    global SUITE, COLLAPSE_K, RUNS_PER_TASK
    SUITE, COLLAPSE_K, RUNS_PER_TASK = settings  # a spawned process starts from the defaults
    limit_threads()
    for t in _tasks_of(task):
        task_data(load_suite(SUITE).task(t))
    before = _rss()
    st = _Stepper(task, backend, n_envs, procs, guard, seed=0)
    st.step()
    if procs > 1:
        added = sum(_rss(p.pid) for p in psutil.Process().children(recursive=True))
    else:
        added = _rss() - before
    st.venv.close()
    queue.put(added / n_envs)


def measure_memory(task: str, backend: str, n_envs: int, procs: int, guard: bool) -> float:
    """Process memory (RSS) added per env, in a fresh process (or its workers)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(
        target=_memory_child,
        args=(task, backend, n_envs, procs, guard, (SUITE, COLLAPSE_K, RUNS_PER_TASK), q),
    )
    proc.start()
    value = q.get()
    proc.join()
    return value


def _tasks_of(task: str) -> list[str]:
    suite = load_suite(SUITE)
    return list(suite.train) if task == TRAIN_SPLIT else [task]


def state_kib(task: str) -> float:
    """Weights + optimizer state of one model (the same in every backend); the
    mean over the batchable tasks of the train split for it."""
    suite = load_suite(SUITE)
    sizes = [
        make_batched_trainee(suite.task(t)).add(seed=0).state_bytes() / 1024
        for t in _tasks_of(task)
        if supports_batching(suite.task(t))
    ]
    return sum(sizes) / len(sizes)


def run_envs(args) -> list[dict]:
    confs = configs(args)
    results: dict[tuple, list[dict]] = {}
    loads: dict[str, float] = {}
    for r in range(args.repeats):
        for task in args.tasks:
            measured = measure_task(task, confs, args.seconds, seed=r)
            loads[task] = os.getloadavg()[0]
            for key, m in measured.items():
                results.setdefault((task, *key), []).append(m)
                print(
                    f"round {r} {task:12s} {key[0]:8s} n={key[1]:3d} procs={key[2]} "
                    f"guard={'on' if key[3] else 'off'}: "
                    f"{m['steps_s']:7.2f} steps/s {m['samples_s']:9.0f} samples/s",
                    flush=True,
                )
    rows = []
    for task in args.tasks:
        kib = state_kib(task)
        for backend, n, procs, guard in confs:
            ms = results[(task, backend, n, procs, guard)]
            rss = math.nan if args.no_rss else measure_memory(task, backend, n, procs, guard)
            print(f"{task:12s} {backend:8s} n={n:3d}: RSS/env {rss / 2**20:7.1f} MiB", flush=True)
            rows.append(
                {
                    "task": task,
                    "backend": backend,
                    "n": n,
                    "procs": procs,
                    "guard": guard,
                    "restores": sum(m["collapses"] for m in ms),
                    "steps": sum(m["steps"] for m in ms),
                    "steps_s": statistics.median(m["steps_s"] for m in ms),
                    "samples_s": statistics.median(m["samples_s"] for m in ms),
                    "rss_env": rss,
                    "state_kib": kib,
                    "load": loads[task],
                }
            )
        mine = [r for r in rows if r["task"] == task]
        for r in mine:
            base = max(
                o["steps_s"] for o in mine if o["backend"] != "batched" and o["guard"] == r["guard"]
            )
            r["speedup"] = r["steps_s"] / base
            off = [
                o["steps_s"]
                for o in mine
                if (o["backend"], o["n"], o["procs"], o["guard"])
                == (r["backend"], r["n"], r["procs"], False)
            ]
            r["guard_cost"] = 1 - r["steps_s"] / off[0] if r["guard"] else math.nan
    return rows


# -- how to batch: one training step per model, three ways ---------------------
def run_kernels(ks=(8, 32), bs: int = 64, reps: int = 30) -> list[tuple[str, int, float]]:
    """Microseconds per model per training step (MNIST-1D MLP, dropout 0.1, Adam)."""
    from torch.func import functional_call, grad, stack_module_state, vmap
    from torch.nn import functional as F

    spec = load_suite("default-v1").task("mnist1d-mlp")
    data = task_data(spec)
    out = []
    tr = build_trainee(spec, {"batch_size": bs}, seed=0)
    t = _time(lambda: tr.train(bs), reps * 4)
    out.append(("one Trainee (nn.Module + torch.optim.Adam)", 1, t))
    for k in ks:
        # rlhpo: explicit stacked forward/backward, fused Adam per model
        g = BatchedTrainee(spec)
        runs = [g.add({"batch_size": bs}, seed=i) for i in range(k)]
        t = _time(lambda runs=runs, g=g: g.train([(r, bs * 4) for r in runs]), reps) / (4 * k)
        out.append(("rlhpo stacked, explicit backward", k, t))
        # autograd through the same stacked bmm forward
        P = [torch.stack(ps).requires_grad_() for ps in zip(*(r.params for r in runs), strict=True)]
        state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in P]
        steps = [torch.tensor(0.0) for _ in range(k)]

        def autograd_step(P=P, state=state, steps=steps, k=k):
            idx = torch.randint(0, data.n_train, (k, bs))
            h = data.x_train[idx]
            for i in range(0, len(P), 2):
                h = torch.baddbmm(P[i + 1], h, P[i].transpose(1, 2))
                if i + 2 < len(P):
                    h = F.dropout(torch.relu(h), 0.1, True)
            loss = F.cross_entropy(h.reshape(k * bs, -1), data.y_train[idx].reshape(-1))
            grads = torch.autograd.grad(loss * k, P)
            _adam_per_model(P, grads, state, steps)

        out.append(("autograd over stacked bmm", k, _time(autograd_step, reps) / k))
        # torch.func: vmap(grad(functional_call)) over stacked module parameters
        models = [r.to_module() for r in runs]
        params, _ = stack_module_state(models)
        base = models[0].to("meta")
        names = list(params)

        def loss_fn(p, x, y, base=base):
            return F.cross_entropy(functional_call(base, p, (x,)), y)

        vgrad = vmap(grad(loss_fn), randomness="different")
        PV = [params[n].detach() for n in names]
        vstate = [(torch.zeros_like(p), torch.zeros_like(p)) for p in PV]
        vsteps = [torch.tensor(0.0) for _ in range(k)]

        def vmap_step(PV=PV, vstate=vstate, vsteps=vsteps, k=k, vgrad=vgrad, names=names):
            idx = torch.randint(0, data.n_train, (k, bs))
            gr = vgrad(dict(zip(names, PV, strict=True)), data.x_train[idx], data.y_train[idx])
            _adam_per_model(PV, [gr[n] for n in names], vstate, vsteps)

        out.append(("torch.func vmap(grad(functional_call))", k, _time(vmap_step, reps) / k))
    return out


def _adam_per_model(P, grads, state, steps) -> None:
    with torch.no_grad():
        for i in range(len(steps)):
            steps[i] += 1
            torch._fused_adam_(
                [p[i] for p in P],
                [g[i] for g in grads],
                [m[i] for m, _ in state],
                [v[i] for _, v in state],
                [],
                [steps[i]] * len(P),
                lr=1e-3,
                beta1=0.9,
                beta2=0.999,
                weight_decay=0.0,
                eps=1e-8,
                amsgrad=False,
                maximize=False,
            )


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e6


def run_func_kernels(
    tasks=("seq-gru", "seq-transformer"), ks=(8, 32), bs: int = 64, steps: int = 5
) -> list[tuple[str, str, int, float, float]]:
    """Milliseconds per run per training step of the torch.func backend and its
    alternatives (dropout 0): how it was built."""
    import copy

    from rlhpo.knobs import set_dropout

    out = []
    hp = {"batch_size": bs, "dropout": 0.0}

    def per_step(fn, k: int) -> float:
        fn(bs)  # warm-up
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            fn(bs * steps)
            best = min(best, (time.perf_counter() - t0) / (k * steps) * 1e3)
        return best

    for task in tasks:
        spec = load_suite("default-v1").task(task)
        tr = build_trainee(spec, hp, seed=0)
        ms = per_step(tr.train, 1)
        out.append((task, "one Trainee (nn.Module + torch.optim)", 1, ms, os.getloadavg()[0]))
        for k in ks:
            g = FunctionalTrainee(spec)
            runs = [g.add(hp, seed=i) for i in range(k)]
            ms = per_step(lambda n, g=g, runs=runs: g.train([(r, n) for r in runs]), k)
            out.append((task, "vmap(functional_call), chosen", k, ms, os.getloadavg()[0]))
        # The same with the module's own layers under vmap (no unrolling, fused attention).
        g = FunctionalTrainee(spec)
        runs = [g.add(hp, seed=i) for i in range(ks[-1])]
        g.train([(r, bs) for r in runs])
        template = copy.deepcopy(runs[0].to_module())
        set_dropout(template, 0.0)
        for p in template.parameters():
            p.requires_grad_(False)
        g.net.module = template
        g.net._mode.saw_attention = False
        name = "vmap over the module as built (nn.GRU / fused attention)"
        try:
            ms = per_step(lambda n, g=g, runs=runs: g.train([(r, n) for r in runs]), ks[-1])
        except RuntimeError as e:  # nn.GRU: no batching rule at all under autograd
            ms, name = math.nan, f"{name}: fails, {str(e).split('.')[0]}"
        out.append((task, name, ks[-1], ms, os.getloadavg()[0]))
        for row in out[-len(ks) - 2 :]:
            print(row, flush=True)
    return out


def write_profile(name: str, n: int, seed: int = 0) -> None:
    """Profile of vector steps on the mixed train split, batched with ``n`` envs:
    where the time goes (cProfile by function, torch.profiler by operator)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import profile

    st = _Stepper(TRAIN_SPLIT, "batched", n, 1, False, seed)
    load0 = os.getloadavg()[0]
    pr = cProfile.Profile()
    pr.enable()
    t0 = time.perf_counter()
    for _ in range(2):
        st.step()
    wall = time.perf_counter() - t0
    pr.disable()
    with profile() as prof:
        st.step()
    st.venv.close()
    buf = io.StringIO()
    stats = pstats.Stats(pr, stream=buf)
    by_class: dict[str, float] = {}
    for (file, _, fn), (_, _, _, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        if fn == "_train_chunk" and file.endswith(("batched.py", "functional.py")):
            by_class[Path(file).name] = by_class.get(Path(file).name, 0.0) + cum
        if fn == "evaluate" and file.endswith("batched.py"):
            by_class["evaluate (all batched)"] = cum
    if "functional.py" in by_class:  # FunctionalTrainee's chunk runs inside the stacked one's
        by_class["batched.py"] -= by_class["functional.py"]
    stats.sort_stats("tottime").print_stats(20)
    lines = [
        f"# Profile: mixed train split, batched, {n} envs",
        "",
        f"Command: `python experiments/throughput.py --profile --ns {n} --out {name}` "
        f"(load average {load0:.1f}).  ",
        f"Two vector steps ({2 * n} env steps) under cProfile: {wall:.1f} s wall.",
        "",
        "## Where the env steps' time goes",
        "",
        "| part | seconds (cumulative) | share of wall |",
        "|---|---:|---:|",
    ]
    names = {
        "batched.py": "stacked MLP/CNN training (BatchedTrainee._train_chunk)",
        "functional.py": "torch.func training: GRU (FunctionalTrainee._train_chunk)",
    }
    for key, cum in sorted(by_class.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {names.get(key, key)} | {cum:.2f} | {cum / wall:.0%} |")
    lines += [
        "",
        "## cProfile, top functions by own time",
        "",
        "```",
        *[ln for ln in buf.getvalue().splitlines() if ln.strip()][-24:],
        "```",
        "",
        "## torch.profiler, one more vector step, top operators by self CPU time",
        "",
        "```",
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
        "```",
    ]
    (OUT / f"{name}_profile.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / name}_profile.md", flush=True)


def run_chunks(tasks, n: int = 32, sizes=(65536, 262144, 1048576), bss=(16, 64, 256)):
    """Milliseconds per run-interval of the batched backend by chunk size."""
    out = []
    for task in tasks:
        spec = load_suite("default-v1").task(task)
        for bs in bss:
            row = []
            for ce in sizes:
                g = BatchedTrainee(spec, chunk_elements=ce)
                runs = [g.add({"batch_size": bs}, seed=i) for i in range(n)]
                g.train([(r, 256) for r in runs])
                t0 = time.perf_counter()
                g.train([(r, spec.interval_samples) for r in runs])
                row.append((time.perf_counter() - t0) / n * 1e3)
            out.append((task, bs, row))
            print(task, bs, [f"{x:.1f}" for x in row], flush=True)
    return out, sizes


def write(rows, kernels, chunks, args, load, func_kernels=None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    cmd = "python experiments/throughput.py " + " ".join(
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if not isinstance(v, bool) and k != "ppo" and v not in ([], "")
    )
    cmd += "".join(f" --{k.replace('_', '-')}" for k, v in vars(args).items() if v is True)
    lines = [
        "# Throughput: one model per env vs batched",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work "
        f"(load average {load[0]:.1f} at start, {load[1]:.1f} at end), torch "
        f"{torch.__version__}, 1 torch thread per process, no GPU.  ",
        "Full-budget episodes from random starts, uniformly random actions, same seeds "
        "for every configuration; the configurations of a task are stepped round-robin "
        f"until each ran >= {args.seconds:g} s (shared machine: load hits all alike); "
        f"medians of {args.repeats} rounds. Env step = one interval of one env's model.",
        "Speedup: env steps/s over the best one-model-per-env configuration of the task. "
        "Memory: weights + Adam state per model (every backend keeps these), and the "
        "process memory (RSS) added per env (subproc: the whole worker process).",
        "",
        f"`{TRAIN_SPLIT}`: the default suite's whole train split, each reset drawing one "
        "of its tasks (weights+Adam: the mean over its tasks). Load: the 1-minute load "
        "average when the task's last round ended.",
        "",
        "Guard: the collapse guard off, or on with its k (``--guard``); guard cost: "
        "1 - steps/s on / steps/s off of the same configuration (speedups compare "
        "configurations with the same guard); restores: the guard's collapse "
        "restores over all timed env steps of the configuration. Batched envs: blocks "
        f"of {RUNS_PER_TASK} slot(s) train one task at a time (runs_per_task).",
        "",
        "| task | backend | envs | procs | guard | env steps/s | samples/s | speedup | "
        "guard cost | restores / env steps | weights+Adam KiB/model | RSS MiB/env | load |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        guard = f"k={COLLAPSE_K:g}" if r["guard"] else "off"
        cost = "" if math.isnan(r["guard_cost"]) else f"{100 * r['guard_cost']:+.0f}%"
        lines.append(
            f"| {r['task']} | {r['backend']} | {r['n']} | {r['procs']} | {guard} | "
            f"{r['steps_s']:.2f} | {r['samples_s']:,.0f} | {r['speedup']:.1f}x | {cost} | "
            f"{r['restores']} / {r['steps']} | {r['state_kib']:.0f} | {r['rss_env'] / 2**20:.1f} | {r['load']:.1f} |"
        )
    if kernels:
        lines += [
            "",
            "## How to batch: one training step, per model",
            "",
            "MNIST-1D MLP (40-128-128-10), batch 64, dropout 0.1, Adam (fused per model in "
            "the batched variants); microseconds per model per step, best of 3.",
            "",
            "| implementation | models | us / model-step |",
            "|---|---:|---:|",
        ]
        lines += [f"| {name} | {k} | {t:.0f} |" for name, k, t in kernels]
    if chunks:
        data, sizes = chunks
        lines += [
            "",
            "## Chunk size of the batched backend",
            "",
            "Milliseconds per run-interval (32 runs, one interval each), by the chunk's "
            f"widest-output budget in elements (default {CHUNK_ELEMENTS}).",
            "",
            "| task | batch | " + " | ".join(str(s) for s in sizes) + " |",
            "|---|---:|" + "---:|" * len(sizes),
        ]
        for task, bs, row in data:
            lines.append(f"| {task} | {bs} | " + " | ".join(f"{x:.1f}" for x in row) + " |")
    if func_kernels:
        lines += [
            "",
            "## How to batch the other families: one training step, per run",
            "",
            "Batch 64, dropout 0, Adam, 10 steps per interval; milliseconds per run per "
            "step, best of 2 (load average in the last column). vmap has no batching rule "
            "for nn.GRU nor torch's fused CPU attention and runs those one run at a time: "
            "the backend unrolls the GRU and computes attention as reference math instead.",
            "",
            "| task | implementation | runs | ms / run-step | load |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {t} | {name} | {k} | {ms:.1f} | {ld:.1f} |" for t, name, k, ms, ld in func_kernels
        ]
    (OUT / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    if rows:
        _plot(rows, args.tasks, args.out)
    print(f"wrote {OUT / args.out}.md and .png")


def _plot(rows, tasks, name: str = "throughput") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rs = [r for r in rows if r["task"] == task]
        labels = [
            f"{r['backend']}\n{r['n']} env{'s' if r['n'] > 1 else ''}"
            + (f"\n{r['procs']} procs" if r["procs"] > 1 else "")
            + ("\nguard" if r["guard"] else "")
            for r in rs
        ]
        colors = ["tab:gray" if r["backend"] != "batched" else "tab:blue" for r in rs]
        ax.bar(range(len(rs)), [r["steps_s"] for r in rs], color=colors)
        for i, r in enumerate(rs):
            ax.text(i, r["steps_s"], f"{r['speedup']:.1f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rs)), labels, fontsize=7)
        ax.set_ylabel("env steps / s (one interval of one model)")
        ax.set_title(task)
    fig.suptitle("rlhpo/HPO-v0 throughput: one model per env (gray) vs batched (blue)")
    fig.tight_layout()
    fig.savefig(OUT / f"{name}.png", dpi=120)


# -- per family: one group of K runs vs K Trainees ---------------------------------
def run_family_groups(k: int, reps: int = 3) -> list[tuple[str, str, str, float, float]]:
    """(family, task, batch sizes, unbatched s / batched s, load) per family and batch mix."""
    from rlhpo.trainees.batched import supports_stacked

    suite = load_suite(SUITE)
    first: dict[str, TaskSpec] = {}
    for t in suite.split("train"):
        first.setdefault(t.model, t)
    mixes = {"one": [64] * k, "mixed": [[16, 64, 128, 256][i % 4] for i in range(k)]}
    rows = []
    for fam, spec in first.items():
        n = spec.interval_samples
        for label, bss in mixes.items():
            group = make_batched_trainee(spec)
            runs = [group.add({"batch_size": b}, seed=i) for i, b in enumerate(bss)]
            trs = [build_trainee(spec, {"batch_size": b}, seed=i) for i, b in enumerate(bss)]

            def batched(group=group, runs=runs, n=n):
                group.train([(r, n) for r in runs])
                group.evaluate(runs)

            def one_by_one(trs=trs, n=n):
                for t in trs:
                    t.train(n)
                    t.evaluate()

            tb, tu = math.inf, math.inf
            for _ in range(reps + 1):  # the first round warms up
                t0 = time.perf_counter()
                batched()
                t1 = time.perf_counter()
                one_by_one()
                t2 = time.perf_counter()
                tb, tu = min(tb, t1 - t0), min(tu, t2 - t1)
            backend = "stacked" if supports_stacked(spec) else "torch.func"
            rows.append((f"{fam} ({backend})", spec.name, label, tu / tb, os.getloadavg()[0]))
            print(f"{fam:8s} {spec.name:28s} {label:5s}: {tu / tb:.2f}x", flush=True)
    return rows


def write_family_groups(rows, k: int, args, load) -> None:
    lines = [
        f"# One group of {k} runs vs {k} Trainees, per family",
        "",
        f"Command: `python experiments/throughput.py --suite {args.suite} "
        f"--family-groups {k} --out {args.out}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work "
        f"(load average {load[0]:.1f} at start, {load[1]:.1f} at end), torch "
        f"{torch.__version__}, 1 torch thread, no GPU.  ",
        f"The first train task of each family of suite `{args.suite}`, default "
        f"hyperparameters; one interval of training plus a validation pass of {k} runs "
        f"in one batched group vs {k} unbatched Trainees one after another, best of 3. "
        f"Batch sizes: one (64 for all) or mixed (16, 64, 128, 256, ...: every batch size "
        "is its own lockstep group, as a policy's random moves make them). "
        "Speedup = unbatched time / batched time (above 1x batching pays).",
        "",
        "| family (backend) | task | batch sizes | speedup | load |",
        "|---|---|---|---:|---:|",
    ]
    lines += [f"| {f} | {t} | {b} | {x:.2f}x | {ld:.1f} |" for f, t, b, x, ld in rows]
    (OUT / f"{args.out}_families.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / args.out}_families.md")


# -- PPO: wall time to the same timesteps ----------------------------------------
PPO_CONFIGS = [
    ("subproc", 2, 128, 2),
    ("batched", 16, 16, 1),
    ("batched", 32, 8, 1),
    ("batched", 32, 8, 2),
]


def run_ppo(timesteps: int, seed: int = 0) -> list[dict]:
    """Wall time of SB3 PPO for ``timesteps`` env steps on the default train split,
    with the shipped recipe's settings (rlhpo/recipes/ppo.toml), by vector env. Every
    configuration collects rollouts of 256 env steps (n_envs x n_steps)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecNormalize

    out = []
    for backend, n_envs, n_steps, procs in PPO_CONFIGS:
        t0 = time.perf_counter()
        venv = make_vec_env(
            "default-v1",
            "train",
            n_envs=n_envs,
            seed=seed,
            backend=backend,
            n_procs=procs if backend == "batched" else 1,
            timing=True,
        )
        venv = VecNormalize(venv, gamma=1.0)
        model = PPO(
            "MlpPolicy",
            venv,
            learning_rate=3e-4,
            n_steps=n_steps,
            batch_size=64,
            n_epochs=10,
            gamma=1.0,
            gae_lambda=0.95,
            ent_coef=0.01,
            seed=seed,
            device="cpu",
        )
        model.learn(total_timesteps=timesteps)
        dt = time.perf_counter() - t0
        episodes = len(model.ep_info_buffer)
        venv.close()
        out.append(
            {
                "backend": backend,
                "n_envs": n_envs,
                "n_steps": n_steps,
                "procs": procs,
                "seconds": dt,
                "timesteps": model.num_timesteps,
                "episodes_seen": episodes,
            }
        )
        print(f"PPO {backend} n_envs={n_envs} procs={procs}: {dt:.1f} s", flush=True)
    return out


def write_ppo(rows: list[dict], timesteps: int, load) -> None:
    base = rows[0]["seconds"]
    lines = [
        "# PPO wall time to the same timesteps: one model per env vs batched",
        "",
        f"Command: `python experiments/throughput.py --ppo {timesteps}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work "
        f"(load average {load[0]:.1f} at start, {load[1]:.1f} at end), 1 torch thread per "
        "process.  ",
        "SB3 PPO with the shipped recipe's settings (rlhpo/recipes/ppo.toml: lr 3e-4, batch 64, "
        "10 epochs, gamma 1, VecNormalize) on the default suite's train split, full "
        "budget, seed 0; every configuration collects 256-step rollouts (n_envs x "
        "n_steps). Wall time includes env construction and the first resets. The "
        "configurations run one after another, not interleaved: on a shared machine "
        "expect tens of percent between runs.",
        "",
        "| vec env | n_envs | procs | n_steps | timesteps | wall s | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['n_envs']} | {r['procs']} | {r['n_steps']} | "
            f"{r['timesteps']} | "
            f"{r['seconds']:.1f} | {base / r['seconds']:.1f}x |"
        )
    (OUT / "throughput_ppo.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'throughput_ppo.md'}")


def main() -> None:
    global SUITE, COLLAPSE_K, RUNS_PER_TASK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", default="mnist1d-mlp,mnist1d-cnn")
    ap.add_argument(
        "--suite", default=SUITE, help="suite of the env rounds (train-split: its train split)"
    )
    ap.add_argument("--ns", default="8,16,32,64")
    ap.add_argument("--ns2", default="32,64", help="batched envs split over 2 processes")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", default="dummy,subproc", help="one-model-per-env backends")
    ap.add_argument("--out", default="throughput", help="results/OUT.md and OUT.png")
    ap.add_argument("--no-rss", action="store_true", help="skip the RSS-per-env measurement")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument(
        "--func-kernels",
        action="store_true",
        help="time the torch.func backend's variants on the GRU and transformer tasks",
    )
    ap.add_argument(
        "--profile", action="store_true", help="profile the mixed split (results/OUT_profile.md)"
    )
    ap.add_argument("--chunks", action="store_true")
    ap.add_argument(
        "--family-groups",
        type=int,
        default=0,
        help="only time K runs batched vs K Trainees per family (results/OUT_families.md)",
    )
    ap.add_argument(
        "--runs-per-task", type=int, default=1, help="batched envs: slots per task block"
    )
    ap.add_argument(
        "--guard",
        type=float,
        default=0.0,
        help="also run every configuration with the collapse guard on, collapse_k=GUARD",
    )
    ap.add_argument(
        "--ppo",
        type=int,
        default=0,
        help="only time PPO for this many timesteps per vector env "
        "(writes results/throughput_ppo.md)",
    )
    args = ap.parse_args()
    if args.guard < 0:
        raise SystemExit(f"--guard must be >= 0 (0: off), got {args.guard}")
    SUITE = args.suite
    COLLAPSE_K = args.guard or COLLAPSE_K
    if args.runs_per_task < 1:
        raise SystemExit(f"--runs-per-task must be >= 1, got {args.runs_per_task}")
    RUNS_PER_TASK = args.runs_per_task
    args.tasks = args.tasks.split(",")
    args.ns = [int(n) for n in args.ns.split(",")]
    args.ns2 = [int(n) for n in args.ns2.split(",") if n]
    args.one = [b for b in args.one.split(",") if b]
    limit_threads()
    load0 = os.getloadavg()[0]
    if args.ppo:
        write_ppo(run_ppo(args.ppo), args.ppo, (load0, os.getloadavg()[0]))
        return
    if args.family_groups:
        rows = run_family_groups(args.family_groups)
        write_family_groups(rows, args.family_groups, args, (load0, os.getloadavg()[0]))
        return
    for task in args.tasks:
        for t in _tasks_of(task):
            task_data(load_suite(SUITE).task(t))  # datasets built before any timing
    kernels = run_kernels() if args.kernels else None
    if kernels:
        for name, k, t in kernels:
            print(f"{name:45s} k={k:3d}: {t:7.1f} us/model-step", flush=True)
    func_kernels = run_func_kernels() if args.func_kernels else None
    if args.profile:
        write_profile(args.out, max(args.ns))
    chunks = run_chunks(args.tasks) if args.chunks else None
    rows = run_envs(args) if args.tasks else []
    write(rows, kernels, chunks, args, (load0, os.getloadavg()[0]), func_kernels)


if __name__ == "__main__":
    main()
