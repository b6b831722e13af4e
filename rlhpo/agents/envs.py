"""Environments for the agents: ``rlhpo/HPO-v0`` wrapped for episode statistics,
single or vectorised (in-process or one subprocess per env)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym

from rlhpo.env import ENV_ID, register_envs

VEC_ENVS = ("dummy", "subproc")


def env_kwargs(
    suite: str = "default",
    split: str = "train",
    tasks: Sequence[str] | None = None,
    budget_scale: float = 1.0,
    compute_penalty: float = 0.1,
    freeze: Sequence[str] = (),
) -> dict[str, Any]:
    """Keyword arguments of ``HPOEnv`` for training (always with ``timing=True``)."""
    return {
        "suite": suite,
        "split": split,
        "tasks": list(tasks) if tasks else None,
        "budget_scale": float(budget_scale),
        "compute_penalty": float(compute_penalty),
        "freeze": tuple(freeze),
        "timing": True,
    }


def make_env(**kwargs: Any) -> gym.Env:
    """One ``rlhpo/HPO-v0`` env with SB3's ``Monitor`` (episode return/length/time in info)."""
    from stable_baselines3.common.monitor import Monitor

    from rlhpo.runtime import limit_threads

    # Also called inside subprocess workers: one torch thread each (see rlhpo.runtime).
    limit_threads()
    register_envs()
    return Monitor(gym.make(ENV_ID, **env_kwargs(**kwargs)))


def _factory(kwargs: dict[str, Any]) -> Callable[[], gym.Env]:
    def _make() -> gym.Env:
        return make_env(**kwargs)

    return _make


def make_vec_env(n_envs: int = 2, seed: int = 0, vec_env: str = "dummy", **kwargs: Any):
    """``n_envs`` monitored envs in a ``DummyVecEnv`` or ``SubprocVecEnv``.

    Env ``i`` gets seed ``seed + i`` at its first reset; later resets continue
    each env's own generator.
    """
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    if vec_env not in VEC_ENVS:
        raise ValueError(f"vec_env must be one of {VEC_ENVS}, got {vec_env!r}")
    fns = [_factory(kwargs) for _ in range(n_envs)]
    if vec_env == "subproc":
        venv = SubprocVecEnv(fns, start_method="forkserver")
    else:
        venv = DummyVecEnv(fns)
    venv.seed(seed)
    return venv
