"""A hand-written plateau controller: the serious rival a learned policy must beat.

CALIBRATION.md measured that a controller which can only *lower* the learning
rate makes every task worse at these budgets (the default lr is usually too low),
while one that also *raises* it closes most of the gap to Optuna in one run. So
this one does both, and also moves batch size and dropout:

- **lr up**: after an interval with a new best validation score, lr x ``lr_up``
  (1.5), capped at ``max_lr``;
- **lr down on a plateau**: ``patience`` intervals without a new best, lr x
  ``lr_down`` (0.5);
- **lr down on a drop**: the validation score fell more than ``drop`` below the
  best (instability), lr x ``lr_down`` at once;
- **batch up on a loss plateau**: the training loss of the last
  ``loss_patience`` intervals is not ``loss_rel`` below the best before them:
  one step up the space's batch sizes (larger batches lower the gradient noise,
  as decaying the lr does, and cost fewer steps);
- **dropout up when the gap widens**: ``log(val loss / train loss)`` is above
  ``gap_min`` and grew more than ``gap_rise`` over the interval: dropout +
  ``dropout_step``.

Scores are normalised validation scores (0 chance, 1 perfect), as in the env.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rlhpo.knobs import SearchSpace
from rlhpo.observation import MetricHistory


@dataclass
class PlateauController:
    """Rules on the validation score, training loss and train/val gap (see module doc)."""

    space: SearchSpace
    lr_up: float = 1.5
    lr_down: float = 0.5
    max_lr: float = 0.03
    patience: int = 2
    min_delta: float = 0.002
    drop: float = 0.1
    loss_patience: int = 3
    loss_rel: float = 0.01
    gap_min: float = 0.05
    gap_rise: float = 0.02
    dropout_step: float = 0.1
    events: list[tuple[int, str]] = field(default_factory=list, init=False)
    _stale: int = field(default=0, init=False, repr=False)
    _since_batch: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("patience", "loss_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not (self.lr_up >= 1.0 and 0.0 < self.lr_down <= 1.0):
            raise ValueError(
                f"lr_up must be >= 1 and lr_down in (0, 1], got {self.lr_up!r}, {self.lr_down!r}"
            )

    def decide(self, history: MetricHistory, hp: dict[str, Any]) -> dict[str, Any]:
        """Knobs for the next interval; records which rules fired in ``events``."""
        recs = history.records
        if len(recs) < 2:  # only the untrained model was seen
            return dict(hp)
        interval = len(recs) - 1
        new = dict(hp)
        cur = recs[-1]
        best_before = max(r.val_score for r in recs[:-1])
        if cur.val_score > best_before + self.min_delta:
            self._stale = 0
            cap = min(self.max_lr, self.space.lr[1])
            if hp["lr"] < cap:
                new["lr"] = min(hp["lr"] * self.lr_up, cap)
                self.events.append((interval, "lr_up"))
        elif cur.val_score < best_before - self.drop:
            self._stale = 0
            new["lr"] = hp["lr"] * self.lr_down
            self.events.append((interval, "lr_down_drop"))
        else:
            self._stale += 1
            if self._stale >= self.patience:
                self._stale = 0
                new["lr"] = hp["lr"] * self.lr_down
                self.events.append((interval, "lr_down_plateau"))

        self._since_batch += 1
        losses = [r.train_loss for r in recs if r.train_loss is not None]
        k = self.loss_patience
        if len(losses) > k and self._since_batch >= k:
            if min(losses[-k:]) > (1.0 - self.loss_rel) * min(losses[:-k]):
                sizes = self.space.batch_sizes
                i = sizes.index(self.space.clip("batch_size", hp["batch_size"]))
                if i + 1 < len(sizes):
                    new["batch_size"] = sizes[i + 1]
                    self._since_batch = 0
                    self.events.append((interval, "batch_up"))

        gaps = [_gap(r.val_loss, r.train_loss) for r in recs if r.train_loss is not None]
        if len(gaps) >= 2 and gaps[-1] > self.gap_min and gaps[-1] - gaps[-2] > self.gap_rise:
            if hp["dropout"] < self.space.dropout[1]:
                new["dropout"] = min(hp["dropout"] + self.dropout_step, self.space.dropout[1])
                self.events.append((interval, "dropout_up"))
        return self.space.clip_all(new)


def _gap(val_loss: float, train_loss: float | None) -> float:
    if train_loss is None or not (val_loss > 0 and train_loss > 0):
        return 0.0
    return math.log(val_loss / train_loss)
