"""Per-episode tuning traces and running episode statistics, shared by both agents."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np


class EpisodeTracer:
    """Collects the hyperparameter and metric trace of each env's episode in flight
    and turns a finished episode into one log record.

    Record keys: ``agent/episode_return``, ``agent/episode_length``, ``hp/lr``,
    ``hp/batch_size``, ``hp/dropout`` (final values), ``val/score`` (raw metric),
    ``val/norm_score``, ``val/loss``, ``train/loss``, ``train/optimizer_steps``,
    ``train/steps_ratio`` (optimizer steps / steps at the default batch size),
    ``train/wall_time``, ``train/diverged``; plus ``task`` and per-interval
    ``trace`` lists (JSONL only: W&B gets the numbers).
    """

    def __init__(self, n_envs: int = 1, window: int = 100):
        self.traces: list[dict[str, list[float]]] = [self._empty() for _ in range(n_envs)]
        self.returns: deque[float] = deque(maxlen=window)
        self.final_scores: deque[float] = deque(maxlen=window)
        self.episodes = 0

    @staticmethod
    def _empty() -> dict[str, list[float]]:
        return {}

    def step(self, env_index: int, info: dict[str, Any]) -> None:
        """Record one step's info of env ``env_index``."""
        tr = self.traces[env_index]
        hp = info.get("hp")
        if hp is None:
            return
        for k, v in hp.items():  # every knob of the env, in registry order
            tr.setdefault(k, []).append(v if isinstance(v, int) else float(v))
        tr.setdefault("val_norm_score", []).append(float(info["val_norm_score"]))

    def end(self, env_index: int, info: dict[str, Any], ret: float, length: int) -> dict[str, Any]:
        """Close env ``env_index``'s episode (``info`` = its last step's info)."""
        trace, self.traces[env_index] = self.traces[env_index], self._empty()
        self.episodes += 1
        self.returns.append(float(ret))
        self.final_scores.append(float(info.get("val_norm_score", float("nan"))))
        hp = info.get("hp", {})
        static = max(int(info.get("static_steps", 0)), 1)
        rec = {
            "episode": self.episodes,
            "task": info.get("task"),
            "agent/episode_return": float(ret),
            "agent/episode_length": int(length),
            **{f"hp/{k}": float(v) for k, v in hp.items()},
            "val/score": float(info.get("val_score", float("nan"))),
            "val/norm_score": float(info.get("val_norm_score", float("nan"))),
            "val/loss": float(info.get("val_loss", float("nan"))),
            "train/loss": float(info.get("train_loss") or float("nan")),
            "train/optimizer_steps": int(info.get("optimizer_steps", 0)),
            "train/steps_ratio": int(info.get("optimizer_steps", 0)) / static,
            "train/wall_time": float(info.get("wall_time", float("nan"))),
            "train/diverged": int(bool(info.get("diverged", False))),
            "trace": trace,
        }
        return rec

    @property
    def mean_return(self) -> float:
        """Mean return of the last ``window`` episodes (nan before the first)."""
        return float(np.mean(self.returns)) if self.returns else float("nan")

    def state(self) -> dict[str, Any]:
        """JSON-able state for checkpoints (episodes in flight are not kept)."""
        return {
            "episodes": self.episodes,
            "returns": list(self.returns),
            "final_scores": list(self.final_scores),
        }

    def load_state(self, st: dict[str, Any]) -> None:
        self.episodes = int(st["episodes"])
        self.returns.extend(st["returns"])
        self.final_scores.extend(st["final_scores"])
