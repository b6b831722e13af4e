"""What the policy sees: a history of per-interval metrics and one versioned encoder
that turns it into a fixed-size, scale-free float32 vector.

The environment and the :class:`~rlhpo.controller.Controller` both use this module,
so a policy sees the same features in training and in use. Change a feature and
``ObservationEncoder.VERSION`` must change: policy files record it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhpo.knobs import KNOBS, LR, SearchSpace


def normalised_score(metric: str, value: float, n_classes: int = 0) -> float:
    """Map a raw metric to a comparable scale: 0 = chance (or a mean predictor), 1 = perfect.

    Accuracy is chance-normalised, ``(acc - 1/K) / (1 - 1/K)``; R^2 is already 0 for
    the mean predictor and is clipped to ``[-1, 1]``.
    """
    if value is None or not math.isfinite(value):
        return 0.0
    if metric == "accuracy":
        if n_classes < 2:
            raise ValueError(f"accuracy needs n_classes >= 2, got {n_classes!r}")
        chance = 1.0 / n_classes
        return (value - chance) / (1.0 - chance)
    if metric == "r2":
        return float(min(max(value, -1.0), 1.0))
    raise ValueError(f"metric must be accuracy or r2, got {metric!r}")


@dataclass
class Record:
    """Metrics at the end of one interval (or at the start: ``train_loss`` None)."""

    val_loss: float
    val_score: float  # normalised, see normalised_score
    train_loss: float | None
    hp: dict[str, Any]
    budget_fraction: float


@dataclass
class MetricHistory:
    """Everything observed so far in one run, oldest first."""

    records: list[Record] = field(default_factory=list)

    def record(
        self,
        *,
        val_loss: float,
        val_score: float,
        train_loss: float | None,
        hp: dict[str, Any],
        budget_fraction: float,
    ) -> Record:
        r = Record(
            float(val_loss),
            float(val_score),
            None if train_loss is None else float(train_loss),
            dict(hp),
            float(budget_fraction),
        )
        self.records.append(r)
        return r

    def __len__(self) -> int:
        return len(self.records)

    @property
    def last(self) -> Record:
        return self.records[-1]

    @property
    def best_score(self) -> float:
        return max(r.val_score for r in self.records)


_CLIP = 10.0


def _log_ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0:
        return 0.0
    return math.log(a / b)


class ObservationEncoder:
    """Turns a :class:`MetricHistory` into the policy's observation vector.

    Features (all scale-free; clipped to [-10, 10]):

    ====  ======================================================================
    0     budget fraction used
    1-3   lr, batch size, dropout: position within the space, mapped to [-1, 1]
    4     validation score (normalised: 0 chance, 1 perfect)
    5     best validation score so far
    6     x10 change of the validation score over the last interval
    7     x10 change of the validation score over the last 3 intervals
    8     log(train loss / reference loss); reference = first validation loss
    9     log(val loss / reference loss)
    10    x5 log(train loss / previous train loss)
    11    x5 log(val loss / previous val loss)
    12    log(val loss / train loss): the generalisation gap
    13    budget fraction since the best validation score
    14    log2 of the lr change at the last decision, / 2
    15    best score minus current score
    16+   the space's opt-in knobs (weight decay, momentum), as 1-3
    ====  ======================================================================

    A space of the three required knobs gives the 16 features every shipped
    policy was trained on (``SIZE``); each opt-in knob adds one (``size``).
    """

    VERSION = 1
    SIZE = 16

    def __init__(self, space: SearchSpace):
        self.space = space
        self.extra = tuple(k for k in space.names if k not in KNOBS)
        self.size = self.SIZE + len(self.extra)

    @classmethod
    def size_for(cls, knobs: tuple[str, ...] | list[str]) -> int:
        """Features for a space of these knobs."""
        return cls.SIZE + sum(1 for k in knobs if k not in KNOBS)

    def encode(self, history: MetricHistory) -> np.ndarray:
        if not history.records:
            raise ValueError("cannot encode an empty history: record at least one evaluation")
        recs = history.records
        cur = recs[-1]
        prev = recs[-2] if len(recs) > 1 else cur
        back3 = recs[-4] if len(recs) > 3 else recs[0]
        ref = recs[0].val_loss
        tl = cur.train_loss if cur.train_loss is not None else cur.val_loss
        ptl = prev.train_loss if prev.train_loss is not None else prev.val_loss
        best_i = max(range(len(recs)), key=lambda i: (recs[i].val_score, i))
        sp = self.space

        def position(k: str) -> float:
            return 2 * sp.to_unit(k, cur.hp[k]) - 1

        lr = LR.name
        f = np.array(
            [
                cur.budget_fraction,
                *(position(k) for k in KNOBS),
                cur.val_score,
                history.best_score,
                10 * (cur.val_score - prev.val_score),
                10 * (cur.val_score - back3.val_score),
                _log_ratio(tl, ref),
                _log_ratio(cur.val_loss, ref),
                5 * _log_ratio(tl, ptl),
                5 * _log_ratio(cur.val_loss, prev.val_loss),
                _log_ratio(cur.val_loss, tl),
                cur.budget_fraction - recs[best_i].budget_fraction,
                math.log2(cur.hp[lr] / prev.hp[lr]) / 2,
                history.best_score - cur.val_score,
                *(position(k) for k in self.extra),
            ],
            dtype=np.float64,
        )
        f = np.nan_to_num(f, nan=0.0, posinf=_CLIP, neginf=-_CLIP)
        return np.clip(f, -_CLIP, _CLIP).astype(np.float32)

    @property
    def low(self) -> float:
        return -_CLIP

    @property
    def high(self) -> float:
        return _CLIP
