"""The search space and the knobs that change a live training run.

One declarative :class:`SearchSpace` bounds the policy's actions *and* the
Optuna baselines, so both search the same space. Each knob knows how to apply
itself to a live run and clips to its bounds (never silently out of range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KNOBS = ("lr", "batch_size", "dropout")


class KnobError(ValueError):
    """An unknown knob name or an unusable value (e.g. NaN)."""


@dataclass(frozen=True)
class SearchSpace:
    """Bounds of the tunable hyperparameters.

    ``lr`` is searched on a log scale in ``[lr[0], lr[1]]``; ``batch_sizes`` is an
    increasing list of allowed batch sizes; ``dropout`` is linear in its bounds.
    """

    lr: tuple[float, float]
    batch_sizes: tuple[int, ...]
    dropout: tuple[float, float]

    def contains(self, knob: str, value: float) -> bool:
        check_knob(knob)
        if knob == "lr":
            return self.lr[0] <= value <= self.lr[1]
        if knob == "batch_size":
            return int(value) in self.batch_sizes
        return self.dropout[0] <= value <= self.dropout[1]

    def describe(self, knob: str) -> str:
        check_knob(knob)
        if knob == "lr":
            return f"[{self.lr[0]:g}, {self.lr[1]:g}] (log)"
        if knob == "batch_size":
            return str(list(self.batch_sizes))
        return f"[{self.dropout[0]:g}, {self.dropout[1]:g}]"

    def clip(self, knob: str, value: float) -> float | int:
        """The value moved into bounds (batch size: the nearest allowed size in log2)."""
        check_knob(knob)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise KnobError(f"{knob} must be a number, got {value!r}")
        if knob == "lr":
            return float(min(max(float(value), self.lr[0]), self.lr[1]))
        if knob == "batch_size":
            v = max(float(value), 1.0)
            return min(self.batch_sizes, key=lambda b: abs(math.log2(b) - math.log2(v)))
        return float(min(max(float(value), self.dropout[0]), self.dropout[1]))

    def clip_all(self, hp: dict[str, Any]) -> dict[str, Any]:
        return {k: self.clip(k, v) for k, v in hp.items()}

    def to_unit(self, knob: str, value: float) -> float:
        """Position of a value inside the bounds, in [0, 1] (log for lr and batch size)."""
        if knob == "lr":
            lo, hi = math.log(self.lr[0]), math.log(self.lr[1])
            return (math.log(value) - lo) / (hi - lo)
        if knob == "batch_size":
            lo, hi = math.log2(self.batch_sizes[0]), math.log2(self.batch_sizes[-1])
            return 0.5 if hi == lo else (math.log2(value) - lo) / (hi - lo)
        lo, hi = self.dropout
        return (value - lo) / (hi - lo)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lr": list(self.lr),
            "batch_size": list(self.batch_sizes),
            "dropout": list(self.dropout),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        return cls(
            lr=(float(d["lr"][0]), float(d["lr"][1])),
            batch_sizes=tuple(int(b) for b in d["batch_size"]),
            dropout=(float(d["dropout"][0]), float(d["dropout"][1])),
        )

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample a configuration from an Optuna trial over exactly this space."""
        return {
            "lr": trial.suggest_float("lr", self.lr[0], self.lr[1], log=True),
            "batch_size": trial.suggest_categorical("batch_size", list(self.batch_sizes)),
            "dropout": trial.suggest_float("dropout", self.dropout[0], self.dropout[1]),
        }


def check_knob(name: str) -> None:
    if name not in KNOBS:
        raise KnobError(f"unknown knob {name!r}; knobs are {', '.join(KNOBS)}")


def set_learning_rate(
    optimizer: torch.optim.Optimizer, lr: float, scheduler: Any | None = None
) -> None:
    """Set the base learning rate of a live run.

    Every param group gets ``lr``. A scheduler such as ``LambdaLR`` recomputes
    the lr from ``base_lrs`` at its next step and would undo a change written only
    into the param groups, so its ``base_lrs`` (and the groups' ``initial_lr``)
    are scaled by the same factor: the schedule's shape is kept, its level moves.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise KnobError(f"lr must be a positive finite number, got {lr!r}")
    for i, group in enumerate(optimizer.param_groups):
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            old_base = scheduler.base_lrs[i]
            cur = group["lr"]
            # Keep the schedule's current multiplier: new lr = lr, base scaled alike.
            factor = lr / cur if cur > 0 else 1.0
            scheduler.base_lrs[i] = old_base * factor
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * factor
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr[i] = lr
        group["lr"] = float(lr)


def get_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def set_dropout(model: nn.Module, p: float) -> int:
    """Set ``p`` of every dropout module (and HF config dropout fields). Returns how many."""
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise KnobError(f"dropout must be in [0, 1), got {p!r}")
    mods = dropout_modules(model)
    for m in mods:
        m.p = float(p)
    # Hugging Face attention reads its dropout from a float attribute or the config
    # in some implementations; keep those in step with the modules.
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None:
            for attr in (
                "hidden_dropout_prob",
                "attention_probs_dropout_prob",
                "attention_dropout",
                "dropout",
            ):
                if isinstance(getattr(cfg, attr, None), float):
                    setattr(cfg, attr, float(p))
        for attr in ("attention_dropout", "dropout_prob"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, float(p))
    return len(mods)


def get_dropout(model: nn.Module) -> float:
    mods = dropout_modules(model)
    return float(mods[0].p) if mods else 0.0
