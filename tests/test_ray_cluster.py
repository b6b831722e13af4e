"""`rlhpo compare --executor ray --address` and `rlhpo train --executor ray --address`
against Ray clusters the tests start with `ray start --head` (plus `ray start --address`
for a second node) and stop."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rlhpo.compare import CompareError
from rlhpo.compare.runner import run_comparison
from tests.test_compare import TINY, _config


def _ray_cli() -> str | None:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.is_file() else shutil.which("ray")


@pytest.fixture
def ray_cluster(tmp_path):
    """A one-node cluster (2 CPUs) started by `ray start --head --block`; yields its
    address. Stopped by signalling that process, which ends only what it started."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    cli = _ray_cli()
    if cli is None:
        pytest.skip("no `ray` command on this machine")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Ray's socket paths must stay short: a temp folder of its own, not pytest's.
    temp = Path(tempfile.mkdtemp(prefix="rlhpo-ray-"))
    log = open(tmp_path / "head.log", "w")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen(
        [cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2"]
        + ["--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 180
        address = None
        while address is None:
            text = (tmp_path / "head.log").read_text()
            m = re.search(r"ray start --address='([^']+)'", text)
            address = m.group(1) if m else None
            assert head.poll() is None, f"ray start exited:\n{text}"
            assert time.monotonic() < deadline, f"no cluster after 180 s:\n{text}"
            time.sleep(1)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _ray_node(cli: str, args: list[str], log_path: Path, env: dict[str, str], ready: str):
    """One `ray start --block` node; yields its log text once ``ready`` appears in it.
    Stopped by signalling that process, which ends only what it started (`ray stop`
    would end every Ray process on the machine, other users' included)."""
    log = open(log_path, "w")
    node = subprocess.Popen(
        [cli, "start", "--block", "--disable-usage-stats", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 180
        while ready not in (text := log_path.read_text()):
            assert node.poll() is None, f"ray start exited:\n{text}"
            assert time.monotonic() < deadline, f"no Ray node after 180 s:\n{text}"
            time.sleep(1)
        yield text
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=120)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        log.close()


@pytest.fixture
def two_node_cluster(tmp_path):
    """A head node and a worker node joined with `ray start --address`, one CPU each,
    both on this machine with their files under one temp folder; yields the address."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    cli = _ray_cli()
    if cli is None:
        pytest.skip("no `ray` command on this machine")
    import rlhpo

    # The nodes' workers import this checkout's rlhpo, as the test process does.
    root = str(Path(rlhpo.__file__).resolve().parents[1])
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": path}
    env |= {"RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # Ray's socket paths must stay short: a temp folder of its own, not pytest's.
    temp = Path(tempfile.mkdtemp(prefix="rlhpo-ray-"))
    port = _free_port()
    common = ["--num-cpus=1", f"--temp-dir={temp}"]
    try:
        with contextlib.ExitStack() as nodes:
            head_args = [f"--port={port}", "--include-dashboard=false", *common]
            # Two nodes on one machine: each its own dashboard agent port.
            head_args.append(f"--dashboard-agent-listen-port={_free_port()}")
            text = nodes.enter_context(
                _ray_node(cli, ["--head", *head_args], tmp_path / "head.log", env, "--block")
            )
            address = re.search(r"ray start --address='([^']+)'", text).group(1)
            worker_args = [f"--address={address}", *common]
            worker_args.append(f"--dashboard-agent-listen-port={_free_port()}")
            nodes.enter_context(
                _ray_node(cli, worker_args, tmp_path / "worker.log", env, "--block")
            )
            yield address, env
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_train_on_a_two_node_ray_cluster(tmp_path, two_node_cluster):
    address, env = two_node_cluster
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlhpo.cli", "train", "--out", str(out), "--suite", "tiny"]
    cmd += ["--executor", "ray", "--address", address, "--timesteps", "40", "--no-wandb"]
    for kv in ("n_envs=4", "n_procs=2", "budget_scale=0.05", "n_steps=5", "batch_size=20"):
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=480)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ray: 2 env actors on 2 node(s)" in proc.stdout
    assert "policy saved" in proc.stdout
    manifest = json.loads((out / "policy" / "manifest.json").read_text())
    assert manifest["timesteps"] == 40 and manifest["suite"] == "tiny"
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    actors = [r for r in log if r.get("event") == "ray_actors"]
    assert len(actors) == 1 and len(set(actors[0]["nodes"])) == 2, actors
    print(f"Ray cluster {address}:\n{proc.stdout}")


@pytest.mark.slow
def test_compare_on_a_ray_cluster(tmp_path, ray_cluster):
    out = tmp_path / "cmp"
    # A fresh `ray start --head` cluster wants token auth from clients; Ray reads the
    # setting when it is imported, hence a process of its own, as a user would run it.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rlhpo.cli", "compare", "--out", str(out), "--suite", TINY]
    cmd += ["--methods", "static,optuna-random:2", "--tasks", "bc-mlp", "--seeds", "2"]
    cmd += ["--starts", "default", "--executor", "ray", "--address", ray_cluster]
    cmd += ["--workers", "2", "--no-wandb", "--bootstrap-reps", "100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=480)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 cells run, 0 already done, 0 failed" in proc.stdout
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], r["seed"]) for r in rows) == [
        ("optuna-random:2", "0"),
        ("optuna-random:2", "1"),
        ("static", "0"),
        ("static", "1"),
    ]
    assert all(0.0 < float(r["norm_test_score"]) <= 1.0 for r in rows)
    print(f"Ray cluster {ray_cluster}:\n{proc.stdout}")


def test_unreachable_ray_address_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import rlhpo.baselines.pbt as pbt

    def refuse(num_cpus=2, address=None):
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    monkeypatch.setattr(pbt, "ensure_ray", refuse)
    cfg = _config(tmp_path / "c", "static", tasks=["bc-mlp"], seeds=[0], starts=["default"])
    cfg.executor, cfg.address = "ray", "127.0.0.1:1"
    with pytest.raises(CompareError, match="--address 127.0.0.1:1: cannot connect.*RAY_AUTH_MODE"):
        run_comparison(cfg, show_progress=False)
