"""Environments for the agents: ``rlhpo/HPO-v0`` wrapped for episode statistics,
single or vectorised: batched (many runs trained together in one process, see
:mod:`rlhpo.vec_env`), in-process or one subprocess per env."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym

from rlhpo.env import ENV_ID, register_envs

VEC_ENVS = ("auto", "batched", "dummy", "subproc")


def env_kwargs(
    suite: str = "default",
    split: str = "train",
    tasks: Sequence[str] | None = None,
    budget_scale: float = 1.0,
    compute_penalty: float = 0.1,
    freeze: Sequence[str] = (),
    lr_scale: Sequence[float] = (1.0, 1.0),
) -> dict[str, Any]:
    """Keyword arguments of ``HPOEnv`` for training (always with ``timing=True``)."""
    return {
        "suite": suite,
        "split": split,
        "tasks": list(tasks) if tasks else None,
        "budget_scale": float(budget_scale),
        "compute_penalty": float(compute_penalty),
        "freeze": tuple(freeze),
        "lr_scale": tuple(lr_scale),
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


def make_vec_env(
    n_envs: int = 2, seed: int = 0, vec_env: str = "dummy", n_procs: int = 1, **kwargs: Any
):
    """``n_envs`` monitored envs (``info["episode"]`` at episode ends).

    ``vec_env``: ``"batched"`` (:class:`rlhpo.vec_env.BatchedVecEnv`: the runs of
    batchable tasks train together, the others one by one in the same process;
    ``n_procs > 1`` shards it over that many processes), ``"auto"`` (batched where
    some task of the split is batchable; else one subprocess per env if there are no
    more envs than cores, else in-process), ``"dummy"`` or ``"subproc"`` (SB3's
    ``DummyVecEnv`` / ``SubprocVecEnv`` of ``HPOEnv``).
    Env ``i`` gets seed ``seed + i`` at its first reset; later resets continue
    each env's own generator.
    """
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    if vec_env not in VEC_ENVS:
        raise ValueError(f"vec_env must be one of {VEC_ENVS}, got {vec_env!r}")
    if n_procs < 1:
        raise ValueError(f"n_procs must be >= 1, got {n_procs}")
    if vec_env == "auto":
        from rlhpo.vec_env import batchable_tasks

        yes, _ = batchable_tasks(
            kwargs.get("suite", "default"), kwargs.get("split", "train"), kwargs.get("tasks")
        )
        if yes:
            vec_env = "batched"
        else:
            vec_env = "subproc" if 1 < n_envs <= (os.cpu_count() or 1) else "dummy"
    if vec_env == "batched":
        from rlhpo.vec_env import make_vec_env as make_batched

        kw = env_kwargs(**kwargs)
        suite = kw.pop("suite")
        split = kw.pop("split")
        return make_batched(
            suite, split, n_envs=n_envs, seed=seed, backend="batched", n_procs=n_procs, **kw
        )
    fns = [_factory(kwargs) for _ in range(n_envs)]
    if vec_env == "subproc":
        venv = SubprocVecEnv(fns, start_method="forkserver")
    else:
        venv = DummyVecEnv(fns)
    venv.seed(seed)
    return venv
