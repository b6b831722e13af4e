"""Environments for the agents: ``rlhpo/HPO-v0`` wrapped for episode statistics,
single (REINFORCE) or vectorised (PPO, through :func:`rlhpo.vec_env.make_vec_env`,
the one vector-env factory)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from rlhpo.env import ENV_ID, EnvConfig, register_envs
from rlhpo.vec_env import BACKENDS, make_vec_env

VEC_ENVS = BACKENDS

__all__ = ["VEC_ENVS", "EnvSettings", "make_env", "make_vec_env"]


def make_env(config: EnvConfig | None = None, **kwargs: Any) -> gym.Env:
    """One ``rlhpo/HPO-v0`` env with SB3's ``Monitor`` (episode return/length/time in info)."""
    from stable_baselines3.common.monitor import Monitor

    register_envs()
    cfg = EnvConfig.of(config, **kwargs)
    return Monitor(gym.make(ENV_ID, config=cfg))


@dataclass
class EnvSettings:
    """The env fields of an agent's recipe (shared by PPO and REINFORCE)."""

    split: str = "train"
    """Suite split to train on; never ``test``."""
    tasks: tuple[str, ...] = ()
    """Restrict training to these tasks of the split (empty: all of them)."""
    budget_scale: float = 1.0
    """Multiply every task's sample budget (tiny values for tests)."""
    compute_penalty: float = 0.1
    """Env's charge for optimizer steps above the default batch size's (see HPOEnv)."""
    freeze: tuple[str, ...] = ()
    """Knobs the policy may not change (ablations)."""
    lr_scale: tuple[float, ...] = (1.0, 1.0)
    """Env's per-episode learning-rate factor range (domain randomisation; see HPOEnv)."""
    obs_version: int = 1
    """Observation encoder version (1 or 2; see HPOEnv); the policy file records it."""

    def env_config(self, suite: str) -> EnvConfig:
        """The training env's config (with the run's wall time in ``info``)."""
        if self.split == "test":
            raise ValueError(
                "split must not be 'test': test tasks are never used to train a policy"
            )
        if len(self.lr_scale) != 2:
            raise ValueError(f"lr_scale must be [low, high], got {list(self.lr_scale)}")
        return EnvConfig(
            suite=suite,
            split=self.split,
            tasks=tuple(self.tasks) or None,
            budget_scale=self.budget_scale,
            compute_penalty=self.compute_penalty,
            freeze=tuple(self.freeze),
            lr_scale=tuple(self.lr_scale),
            obs_version=self.obs_version,
            timing=True,
        )
