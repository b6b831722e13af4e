"""Learning-rate schedules users reach for: cosine decay, step decay, and warm-up +
cosine (one-cycle style) with a peak learning rate tuned on the train split.

Each schedule is a multiplier of the base learning rate as a function of the
optimizer step, wrapped in ``torch.optim.lr_scheduler.LambdaLR`` and stepped every
optimizer step by the Trainee. The total number of steps is known in advance
because these baselines keep the batch size fixed (:func:`planned_steps`). A later
change of the lr knob moves the schedule's level and keeps its shape
(``rlhpo.knobs.set_learning_rate`` scales ``base_lrs``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhpo.tasks.spec import TaskSpec

WARMUP_FRACTION = 0.1  # share of the steps spent warming up
WARMUP_START = 0.04  # warm-up starts at peak / 25, as torch's OneCycleLR does
STEP_MILESTONES = (0.5, 0.75)  # step decay: x gamma at half and three quarters of the steps
STEP_GAMMA = 0.1
TUNED_FILE = "warmup_cosine.json"


def planned_steps(spec: TaskSpec, batch_size: int) -> int:
    """Optimizer steps a run of ``spec`` takes at a fixed batch size.

    Intervals are trained separately and each one's last batch may be partial, so
    this sums the steps per interval rather than dividing the budget once.
    """
    total, done = 0, 0
    while done < spec.budget_samples:
        n = min(spec.interval_samples, spec.budget_samples - done)
        total += math.ceil(n / batch_size)
        done += n
    return total


@dataclass(frozen=True)
class CosineDecay:
    """Cosine from 1 to 0 over ``total`` steps."""

    total: int

    def __call__(self, step: int) -> float:
        t = min(step / max(self.total, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class StepDecay:
    """x ``gamma`` at each milestone (fractions of ``total`` steps)."""

    total: int
    milestones: tuple[float, ...] = STEP_MILESTONES
    gamma: float = STEP_GAMMA

    def __call__(self, step: int) -> float:
        passed = sum(step >= m * self.total for m in self.milestones)
        return self.gamma**passed


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from ``start`` x peak to the peak over ``warmup`` of the steps,
    then cosine to 0 (one-cycle shape). The peak is the base learning rate."""

    total: int
    warmup: float = WARMUP_FRACTION
    start: float = WARMUP_START

    def __call__(self, step: int) -> float:
        w = max(1, round(self.warmup * self.total))
        if step < w:
            return self.start + (1.0 - self.start) * step / w
        t = min((step - w) / max(self.total - w, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class LambdaSchedule:
    """A scheduler factory (optimizer -> LambdaLR) for ``build_trainee(scheduler=...)``.

    A dataclass rather than a closure so it can travel to worker processes.
    """

    multiplier: Any

    def __call__(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.multiplier)


def schedule_for(kind: str, spec: TaskSpec, batch_size: int) -> LambdaSchedule:
    """The scheduler factory of ``kind`` (cosine, step, warmup-cosine) for a run of ``spec``."""
    if kind not in ("cosine", "step", "warmup-cosine"):
        raise ValueError(f"schedule must be cosine, step or warmup-cosine, got {kind!r}")
    total = planned_steps(spec, batch_size)
    if kind == "cosine":
        return LambdaSchedule(CosineDecay(total))
    if kind == "step":
        return LambdaSchedule(StepDecay(total))
    return LambdaSchedule(WarmupCosine(total))


def tuned_file() -> Path:
    """Where the warm-up + cosine peak tuned on the train split is committed
    (``RLHPO_BASELINES`` overrides the folder)."""
    from rlhpo.shipped import calibrated_dir

    return calibrated_dir() / TUNED_FILE


def optimizer_kind(optimizer: str) -> str:
    """``"sgd"`` or ``"adam"`` (Adam, AdamW and other adaptive optimizers): the two
    families whose good learning rates differ by an order of magnitude."""
    return "sgd" if str(optimizer).lower() == "sgd" else "adam"


def tuned_peak(suite_name: str, optimizer: str | None = None) -> tuple[float, str]:
    """The tuned peak lr for ``suite_name`` (and ``optimizer``'s kind, where the file
    holds one per kind) and where it came from.

    A suite without its own entry uses the ``default`` suite's value (its tasks were
    never seen by that tuning either); the returned source says so.
    """
    path = tuned_file()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run `python experiments/tune_warmup_cosine.py` to tune the "
            f"warm-up + cosine peak on the train split, or give it as warmup-cosine?peak=0.01"
        )
    data = json.loads(path.read_text())
    suites = data.get("suites", {})
    key = suite_name if suite_name in suites else "default"
    if key not in suites:
        raise ValueError(f"{path} holds no entry for suite {suite_name!r} nor 'default'")
    entry = suites[key]
    by_kind = entry.get("peak_lr_by_optimizer") or {}
    kind = optimizer_kind(optimizer) if optimizer is not None else None
    if kind is not None and kind in by_kind:
        peak, what = float(by_kind[kind]), f" for {kind}"
    else:
        peak, what = float(entry["peak_lr"]), ""
    if not (math.isfinite(peak) and peak > 0):
        raise ValueError(f"{path}: peak_lr for suite {key!r} must be > 0, got {peak!r}")
    return peak, f"tuned on {key}/train{what} ({path.name})"
