"""`rlhpo compare --executor ray --address` against a Ray cluster the test starts with
`ray start --head` (and stops)."""

from __future__ import annotations

import csv
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
