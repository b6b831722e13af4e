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
    collapse_k: float = 0.0
    """The do-no-harm guard during training (:class:`rlhpo.safety.CollapseRule`'s k;
    0 = off), so the policy learns with it; the policy file records it."""
    rollback: bool = False
    """On a divergence go back to the last good state at a quarter of the lr and train
    on, as the Controller does in use (see HPOEnv), instead of ending the episode."""
    base_schedule: str = "none"
    """``"none"`` or ``"warmup-cosine"``: residual control over the schedule tuned on
    the suite's train split (see :mod:`rlhpo.residual`); the policy file records it."""
    base_peak: str = "tuned"
    """Where the schedule's level starts: ``"tuned"`` (its tuned peak) or ``"user"``
    (the episode's starting lr x ``peak_factor``, for fine-tuning suites); needs
    ``base_schedule``."""
    peak_factor: float = 1.0
    """With ``base_peak = "user"``, the factor on the starting lr."""

    def env_config(self, suite: str) -> EnvConfig:
        """The training env's config (with the run's wall time in ``info``)."""
        if self.split == "test":
            raise ValueError(
                "split must not be 'test': test tasks are never used to train a policy"
            )
        if self.collapse_k < 0:
            raise ValueError(f"collapse_k must be >= 0 (0 = off), got {self.collapse_k!r}")
        if len(self.lr_scale) != 2:
            raise ValueError(f"lr_scale must be [low, high], got {list(self.lr_scale)}")
        if self.base_schedule == "none" and (self.base_peak, self.peak_factor) != ("tuned", 1.0):
            raise ValueError(
                f"base_peak={self.base_peak!r} / peak_factor={self.peak_factor!r} need a "
                f"base_schedule, got base_schedule='none'"
            )
        config = EnvConfig(
            suite=suite,
            split=self.split,
            tasks=tuple(self.tasks) or None,
            budget_scale=self.budget_scale,
            compute_penalty=self.compute_penalty,
            freeze=tuple(self.freeze),
            lr_scale=tuple(self.lr_scale),
            obs_version=self.obs_version,
            collapse_k=self.collapse_k if self.collapse_k > 0 else None,
            rollback=self.rollback,
            base_schedule=self.base_schedule,
            timing=True,
        )
        if config.base_schedule is None:
            return config
        base = config.base_schedule.with_peak(self.base_peak, self.peak_factor)
        return EnvConfig.of(config, base_schedule=base)

    def env_record(self, config: EnvConfig) -> dict[str, Any]:
        """What a policy file records of the env it was trained in."""
        base = config.base_schedule
        return {
            "compute_penalty": self.compute_penalty,
            "budget_scale": self.budget_scale,
            "freeze": list(self.freeze),
            "lr_scale": list(self.lr_scale),
            "obs_version": self.obs_version,
            "collapse_k": config.collapse_k,
            "rollback": config.rollback,
            "base_schedule": None if base is None else base.to_json(),
        }
