"""What the policy sees: a history of per-interval metrics and one versioned encoder
that turns it into a fixed-size, scale-free float32 vector.

The environment and the :class:`~rlhpo.controller.Controller` both use this module,
so a policy sees the same features in training and in use. Change a feature and
``ObservationEncoder.VERSION`` must change: policy files record it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    # The training loss's trend and noise within the interval (see loss_trend);
    # None when the per-batch losses were not reported.
    loss_slope: float | None = None
    loss_noise: float | None = None


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
        batch_losses: Sequence[float] | None = None,
    ) -> Record:
        """Append one interval's metrics; ``batch_losses`` (the interval's per-batch
        training losses, in order) are summarised at once, never kept."""
        slope, noise = loss_trend(batch_losses) if batch_losses is not None else (None, None)
        r = Record(
            float(val_loss),
            float(val_score),
            None if train_loss is None else float(train_loss),
            dict(hp),
            float(budget_fraction),
            slope,
            noise,
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


def loss_trend(batch_losses: Sequence[float]) -> tuple[float | None, float | None]:
    """Slope and noise of one interval's per-batch training losses, both scale-free.

    ``slope``: least-squares slope of log loss against the position in the interval
    (0 first batch, 1 last), so it is the change of log loss over the interval
    whatever the number of batches. ``noise``: std of the fit's residuals in log
    loss, a relative spread. ``(None, None)`` with fewer than 3 finite positive
    losses (a fit needs them).
    """
    y = np.asarray([v for v in batch_losses if math.isfinite(v) and v > 0], dtype=np.float64)
    n = y.size
    if n < 3:
        return None, None
    y = np.log(y)
    x = np.linspace(0.0, 1.0, n)
    xc = x - x.mean()
    slope = float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))
    resid = y - y.mean() - slope * xc
    return slope, float(np.sqrt(np.dot(resid, resid) / (n - 2)))


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


def _last_lr_change(recs: list[Record]) -> int:
    """Index of the record just before the run's lr last changed (0 if it never did):
    the state the current lr started from."""
    lr = LR.name
    for j in range(len(recs) - 1, 0, -1):
        if recs[j].hp[lr] != recs[j - 1].hp[lr]:
            return j - 1
    return 0


class ObservationEncoderV2(ObservationEncoder):
    """Version 2: v1's features, but the lr relative to the run's start instead of its
    position in the space, plus features of how the run responds.

    Why the lr changes: a v1 policy sees where the lr sits between the space's bounds,
    so it can learn "go to 1e-2" whatever the run does. v2 sees only how far the lr
    moved from where the run started (and, as in v1, its last change), so reacting to
    the response is the only way to tell a good lr from a bad one. No feature names
    an absolute scale, so none identifies the task.

    ====  ======================================================================
    0     budget fraction used
    1     log2(lr / the run's start lr) / 4
    2-3   batch size, dropout: position within the space, mapped to [-1, 1]
    4-15  as v1
    16    x10 change of the validation score since the last lr change
    17    log(train loss / train loss when the lr last changed)
    18    budget fraction since the last lr change
    19    x5 slope of log training loss within the last interval (per-batch losses)
    20    x10 noise of log training loss within the last interval (std of residuals)
    21+   the space's opt-in knobs, as 2-3
    ====  ======================================================================

    "When the lr last changed" is the record before the first interval trained at the
    current lr (the start if it never changed). 19-20 are 0 where the per-batch losses
    were not reported (see :func:`loss_trend`).
    """

    VERSION = 2
    SIZE = 21

    def encode(self, history: MetricHistory) -> np.ndarray:
        base = super().encode(history).astype(np.float64)
        recs = history.records
        cur = recs[-1]
        lr = LR.name
        ref = recs[_last_lr_change(recs)]
        tl = cur.train_loss if cur.train_loss is not None else cur.val_loss
        rtl = ref.train_loss if ref.train_loss is not None else ref.val_loss
        lr_rel = math.log2(cur.hp[lr] / recs[0].hp[lr]) / 4 if recs[0].hp[lr] > 0 else 0.0
        response = [
            10 * (cur.val_score - ref.val_score),
            _log_ratio(tl, rtl),
            cur.budget_fraction - ref.budget_fraction,
            5 * cur.loss_slope if cur.loss_slope is not None else 0.0,
            10 * cur.loss_noise if cur.loss_noise is not None else 0.0,
        ]
        n_base = ObservationEncoder.SIZE
        f = np.concatenate([[base[0], lr_rel], base[2:n_base], response, base[n_base:]])
        f = np.nan_to_num(f, nan=0.0, posinf=_CLIP, neginf=-_CLIP)
        return np.clip(f, -_CLIP, _CLIP).astype(np.float32)


#: A normalised validation score below this has not clearly left chance.
CHANCE_BAND = 0.1
#: A training loss within this (in log) of the reference loss has not moved.
LOSS_BAND = 0.05


def stuck_fractions(history: MetricHistory) -> tuple[float, float]:
    """How long the run has been stuck, as budget fractions.

    ``(at_chance, loss_flat)``: the budget used while every validation score so far
    stayed below :data:`CHANCE_BAND` (0 once one rose above it), and the budget used
    while no training loss so far fell more than :data:`LOSS_BAND` (log) below the
    untrained model's validation loss (0 once one did; a loss that rises or wobbles
    has not started to fall).
    """
    recs = history.records
    cur = recs[-1]
    ref = recs[0].val_loss
    at_chance = cur.budget_fraction if history.best_score < CHANCE_BAND else 0.0
    fell = any(_log_ratio(r.train_loss, ref) < -LOSS_BAND for r in recs if r.train_loss is not None)
    loss_flat = 0.0 if fell else cur.budget_fraction
    return at_chance, loss_flat


class ObservationEncoderV3(ObservationEncoderV2):
    """Version 3: v2's features plus two that say a run has not started learning.

    The prior's misses all had one shape (issue #22): runs that never leave chance,
    an attention model at too high a peak or a recurrent net whose loss never moved.
    v2 shows the current and best score, but not for how long nothing has happened.

    ====  ======================================================================
    0-20  as v2
    21    budget fraction spent with the best validation score still below
          :data:`CHANCE_BAND` (0 once the run has left chance)
    22    budget fraction spent before the training loss first fell
          :data:`LOSS_BAND` below the untrained model's loss (0 once it did)
    23+   the space's opt-in knobs, as 2-3
    ====  ======================================================================
    """

    VERSION = 3
    SIZE = 23
    #: Where the features a rule reads sit (see :class:`rlhpo.baselines.rescue.RescueRule`).
    LR_REL, AT_CHANCE, LOSS_FLAT = 1, 21, 22

    def encode(self, history: MetricHistory) -> np.ndarray:
        v2 = super().encode(history)
        n = ObservationEncoderV2.SIZE
        stuck = np.asarray(stuck_fractions(history), dtype=np.float32)
        return np.concatenate([v2[:n], stuck, v2[n:]]).astype(np.float32)


ENCODERS: dict[int, type[ObservationEncoder]] = {
    1: ObservationEncoder,
    2: ObservationEncoderV2,
    3: ObservationEncoderV3,
}
"""Every observation encoder this rlhpo has, by version."""


def encoder_class(version: int) -> type[ObservationEncoder]:
    """The encoder of ``version``; an error naming the versions this rlhpo has."""
    cls = (
        ENCODERS.get(version)
        if isinstance(version, int) and not isinstance(version, bool)
        else None
    )
    if cls is None:
        have = ", ".join(f"v{v}" for v in ENCODERS)
        raise ValueError(f"observation encoder v{version} is not in this rlhpo (it has {have})")
    return cls
