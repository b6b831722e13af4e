"""Measure PPO env steps/s of `rlhpo train` with the local executor and with Ray
(1 node; 2 nodes: a head plus a worker node joined with `ray start --address`).

Every configuration runs the same command line, the same recipe and the same shard
layout (``n_procs`` shards: worker processes locally, Ray actors with Ray); only
``--executor``/``--address`` change. Steps/s is the run's own figure: timesteps over
the training wall time, which starts once the env shards are up (so actor start-up
is not in it; the whole command's wall time is reported beside it). The Ray nodes
are started here with `ray start --block` in a temp folder and stopped by signalling
those processes.

    python experiments/train_ray_speed.py --timesteps 256 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Four fast, batchable train tasks of the default suite (MLP, ResMLP, CNN1d): the
# whole split's GRU/transformer tasks would take the run past its 10-minute budget.
TASKS = ["mlp-00-wine", "mlp-02-digits", "resmlp-01-digits", "cnn1d-01-mnist1d"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {
        **os.environ,
        "PYTHONPATH": path,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
    }


@contextlib.contextmanager
def _node(args: list[str], log: Path) -> Iterator[str]:
    """A `ray start --block` node; yields its log text once it is up."""
    cli = str(Path(sys.executable).parent / "ray")
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [cli, "start", "--block", "--disable-usage-stats", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    try:
        deadline = time.monotonic() + 180
        while "--block" not in (text := log.read_text()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{text}")
            time.sleep(1)
        yield text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def cluster(cpus_per_node: list[int], work: Path) -> Iterator[str]:
    """A Ray cluster on this machine: one node per entry (the first is the head)."""
    temp = Path(tempfile.mkdtemp(prefix="rlhpo-ray-"))  # short socket paths
    try:
        with contextlib.ExitStack() as stack:
            head = [f"--port={_free_port()}", "--include-dashboard=false", f"--temp-dir={temp}"]
            head += [f"--num-cpus={cpus_per_node[0]}"]
            head += [f"--dashboard-agent-listen-port={_free_port()}"]
            text = stack.enter_context(_node(["--head", *head], work / "head.log"))
            address = re.search(r"ray start --address='([^']+)'", text).group(1)
            for i, cpus in enumerate(cpus_per_node[1:]):
                args = [f"--address={address}", f"--num-cpus={cpus}", f"--temp-dir={temp}"]
                args += [f"--dashboard-agent-listen-port={_free_port()}"]
                stack.enter_context(_node(args, work / f"worker{i}.log"))
            yield address
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def train(args: argparse.Namespace, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "rlhpo.cli", "train", "--out", str(out), "--no-wandb"]
    cmd += ["--suite", "default", "--timesteps", str(args.timesteps), "--seed", "0"]
    cmd += ["--set", f"tasks={json.dumps(args.tasks)}", "--set", f"n_envs={args.n_envs}"]
    cmd += ["--set", f"n_procs={args.n_procs}", "--set", f"n_steps={args.n_steps}", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    m = json.loads((out / "policy" / "manifest.json").read_text())
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    nodes = [r["nodes"] for r in log if r.get("event") == "ray_actors"]
    return {
        "timesteps": m["timesteps"],
        "train_s": m["train_wall_time_s"],
        "steps_per_s": m["timesteps"] / m["train_wall_time_s"],
        "command_s": wall,
        "nodes": len(set(nodes[0])) if nodes else None,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timesteps", type=int, default=256)
    ap.add_argument("--n-envs", type=int, default=16)
    ap.add_argument("--n-procs", type=int, default=2)
    ap.add_argument("--n-steps", type=int, default=8)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "experiments/results/train_ray_speed.md"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="train-ray-speed-"))
    load_start = os.getloadavg()
    n = a.n_procs
    names = [
        "local (worker processes)",
        f"ray, 1 node ({n} CPUs)",
        f"ray, {n} nodes (head + {n - 1} worker, 1 CPU each)",
    ]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    try:
        for rep in range(a.repeats):  # interleaved, so load drifts hit every executor
            runs[names[0]].append(train(a, work / f"local{rep}", []))
            with cluster([n], work) as address:
                ray_flags = ["--executor", "ray", "--address", address]
                runs[names[1]].append(train(a, work / f"ray1-{rep}", ray_flags))
            with cluster([1] * n, work) as address:
                ray_flags = ["--executor", "ray", "--address", address]
                runs[names[2]].append(train(a, work / f"ray2-{rep}", ray_flags))
            for name in names:
                print(rep, name, runs[name][-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()
    import torch

    command = "python experiments/train_ray_speed.py " + " ".join(sys.argv[1:])
    lines = [
        "# `rlhpo train` env steps/s: local executor vs Ray (1 node, 2 nodes)",
        "",
        f"Command: `{command.strip()}`  ",
        f"Each configuration ran: `rlhpo train --suite default --timesteps {a.timesteps} "
        f"--seed 0 --set tasks={json.dumps(a.tasks)} --set n_envs={a.n_envs} "
        f"--set n_procs={a.n_procs} --set n_steps={a.n_steps} --no-wandb` plus the executor "
        "flags; the rest is the shipped PPO recipe (auto batches: 16 envs on 4 batchable "
        "tasks).  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, 1 thread per process, "
        f"Ray {_ray_version()}.  ",
        f"Load average (1/5/15 min): {_fmt(load_start)} at the start, {_fmt(load_end)} at the "
        "end; the machine was shared with other jobs, so every figure is noisy.",
        "",
        '**Both Ray "nodes" are on this same 2-core machine**: the 2-node cluster is a head '
        "and a worker node started with `ray start` here, so it shows what the "
        "executor costs (actor calls, object store, scheduling), not what a second "
        "machine would add. With more machines, each node brings its own cores to its "
        "shard.",
        "",
        "| executor | nodes the actors ran on | timesteps | env steps/s (median) | "
        "env steps/s per run | training s per run | whole command s per run | "
        "load (1 min) after each run |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    for name in names:
        rs = runs[name]
        nodes = sorted({r["nodes"] for r in rs if r["nodes"]})
        lines.append(
            f"| {name} | {'/'.join(map(str, nodes)) or '-'} | {rs[0]['timesteps']} | "
            f"{statistics.median(r['steps_per_s'] for r in rs):.1f} | "
            + " | ".join(
                ", ".join(fmt.format(r[k]) for r in rs)
                for k, fmt in (
                    ("steps_per_s", "{:.1f}"),
                    ("train_s", "{:.1f}"),
                    ("command_s", "{:.0f}"),
                    ("load", "{:.2f}"),
                )
            )
            + " |"
        )
    lines += [
        "",
        "Steps/s = timesteps / training wall time (from the shards being up to the last "
        "PPO update, learner included). The whole command also starts Python, imports "
        "torch and, for Ray, connects and starts the actors.",
    ]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _fmt(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def _ray_version() -> str:
    import ray

    return ray.__version__


if __name__ == "__main__":
    main()
