"""The package data (suites, recipes, calibrated baselines, shipped policies) travels in
the wheel: build one, install it into a folder of its own and use it from outside the
repository, where the source tree cannot be imported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = [
    "rlhpo/suites/default.toml",
    "rlhpo/suites/finetune.toml",
    "rlhpo/suites/tiny.toml",
    "rlhpo/recipes/ppo.toml",
    "rlhpo/recipes/reinforce.toml",
    "rlhpo/baselines/calibrated/warmup_cosine.json",
    "rlhpo/policies/default/manifest.json",
    "rlhpo/policies/default/policy.safetensors",
    "rlhpo/policies/reinforce/manifest.json",
    "rlhpo/policies/reinforce/policy.safetensors",
]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    print(f"$ {' '.join(str(c) for c in cmd)}\n{out}")
    assert done.returncode == 0, out
    return out


@pytest.mark.slow
def test_wheel_installs_with_its_data_and_runs_outside_the_repo(tmp_path):
    # Build from a copy of what the wheel is made of, so the checkout gets no build/.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "rlhpo", src / "rlhpo", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", str(src)], tmp_path, env
    )
    (wheel,) = (tmp_path / "dist").glob("rlhpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in DATA if f not in names]
    assert not missing, f"not in the wheel: {missing}"

    # Installed into a folder of its own; run with the shared interpreter (torch and the
    # other dependencies) from a folder outside the repository.
    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], tmp_path, env)
    work = tmp_path / "work"
    work.mkdir()
    env = {**env, "PYTHONPATH": str(site), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    where = _run([sys.executable, "-c", "import rlhpo; print(rlhpo.__file__)"], work, env)
    assert Path(where.strip()).resolve().is_relative_to(site.resolve()), where
    rlhpo = [sys.executable, "-m", "rlhpo.cli"]
    if (site / "bin" / "rlhpo").exists():
        rlhpo = [str(site / "bin" / "rlhpo")]

    out = _run([*rlhpo, "tasks"], work, env)
    assert "cnn2d-shapes" in out  # the default suite (v2), found inside the installed package
    out = _run([*rlhpo, "policy", "info", "default"], work, env)
    assert "weights OK" in out
    out = _run(
        [
            *rlhpo,
            "apply",
            "--policy",
            "default",
            "--suite",
            "tiny",
            "--task",
            "bc-mlp",
            "--seed",
            "0",
            "--out",
            str(work / "apply"),
            "--no-wandb",
        ],
        work,
        env,
    )
    assert (work / "apply" / "trace.csv").is_file(), out
    # The Controller's default space comes from the installed default suite.
    code = (
        "import rlhpo.controller as c; print(type(c.default_space()).__name__); "
        "from rlhpo.baselines.schedules import tuned_peak; print(tuned_peak('default'))"
    )
    out = _run([sys.executable, "-c", code], work, env)
    assert "SearchSpace" in out and "warmup_cosine.json" in out
