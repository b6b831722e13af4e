"""Agents that learn a tuning policy on ``rlhpo/HPO-v0``: PPO (stable-baselines3),
REINFORCE (own, one readable module) and vine (policy improvement from branch
rollouts with common random numbers, one readable module). All checkpoint without pickle, resume, log to
W&B + JSONL, and save a :mod:`rlhpo.policy` file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

AGENTS = ("ppo", "reinforce", "vine")


def settings_class(agent: str) -> type:
    """The settings dataclass of ``agent``."""
    if agent == "ppo":
        from rlhpo.agents.ppo import PPOSettings

        return PPOSettings
    if agent == "reinforce":
        from rlhpo.agents.reinforce import ReinforceSettings

        return ReinforceSettings
    if agent == "vine":
        from rlhpo.agents.vine import VineSettings

        return VineSettings
    raise ValueError(f"agent must be one of {AGENTS}, got {agent!r}")


def load_settings(agent: str, recipe: str | None = None, overrides: list[str] = ()) -> Any:
    """Settings from ``agents/<agent>.toml`` (or ``recipe``) plus ``key=value`` overrides."""
    from rlhpo.agents.recipe import load_recipe

    return load_recipe(settings_class(agent), agent, recipe, list(overrides))


def train(agent: str, settings: Any, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Train ``agent``; ``kwargs`` as :func:`rlhpo.agents.ppo.train_ppo` (REINFORCE and
    vine: ``executor="local"`` only)."""
    if agent == "ppo":
        from rlhpo.agents.ppo import train_ppo

        return train_ppo(settings, out, **kwargs)
    if agent in ("reinforce", "vine"):
        executor = kwargs.pop("executor", "local")
        kwargs.pop("address", None)
        if executor != "local":
            raise ValueError(REINFORCE_LOCAL_ONLY.format(executor=executor))
        if agent == "reinforce":
            from rlhpo.agents.reinforce import train_reinforce

            return train_reinforce(settings, out, **kwargs)
        from rlhpo.agents.vine import train_vine

        return train_vine(settings, out, **kwargs)
    raise ValueError(f"agent must be one of {AGENTS}, got {agent!r}")


# REINFORCE steps one env in this process and vine its own worker processes: there
# are no env shards to put in actors.
REINFORCE_LOCAL_ONLY = (
    "--executor {executor} runs PPO's env shards as Ray actors; reinforce and vine run "
    "their envs in local processes: use --agent ppo with --executor {executor}, or "
    "--executor local"
)

__all__ = ["AGENTS", "load_settings", "settings_class", "train"]
