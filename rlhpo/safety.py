"""One safety rule for every training run rlhpo drives: the env, single runs
(static, schedules, plateau, Optuna trials), PBT members and the Controller.

:class:`DivergenceRule` says when a run has diverged: a non-finite training or
validation loss, or either loss above ``explode_factor`` x the reference loss (the
untrained model's validation loss). :class:`CollapseRule` says when a run that has
not diverged has collapsed: its validation score fell below its best by more than
``k`` x the score's noise. What happens then (end the episode, roll back) is the
caller's; the rules only judge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Either loss above this x the reference loss counts as divergence (the one place
#: the factor is set; measured: no committed run's validation loss rose above 2.7x).
EXPLODE_FACTOR = 10.0
#: Reference losses below this are treated as this (a perfect start still has a scale).
LOSS_FLOOR = 1e-8
#: Collapse: how many noise units below the best score a run must fall.
COLLAPSE_K = 3.0
#: The smallest noise the collapse rule assumes (normalised score units).
NOISE_FLOOR = 1e-3


@dataclass(frozen=True)
class DivergenceRule:
    """Non-finite values, or a training or validation loss above ``explode_factor``
    x the reference loss."""

    explode_factor: float = EXPLODE_FACTOR

    def __post_init__(self) -> None:
        if not (math.isfinite(self.explode_factor) and self.explode_factor > 1):
            raise ValueError(
                f"explode_factor must be a finite number > 1, got {self.explode_factor!r}"
            )

    def check(
        self,
        ref_loss: float | None,
        train_loss: float | None,
        val_loss: float | None,
        *,
        stopped: bool = False,
    ) -> str | None:
        """Why the interval counts as divergence, or None.

        ``stopped``: the trainee stopped the interval on a non-finite loss.
        ``train_loss`` None: not reported (the Controller's users may not know it).
        """
        if stopped:
            return "a training loss turned non-finite"
        if train_loss is not None and not math.isfinite(train_loss):
            return f"training loss is {train_loss}"
        if val_loss is None or not math.isfinite(val_loss):
            return f"validation loss is {val_loss}"
        if ref_loss is None:
            return None
        limit = self.explode_factor * max(ref_loss, LOSS_FLOOR)
        if train_loss is not None and train_loss > limit:
            return (
                f"training loss {train_loss:.4g} > {self.explode_factor:g} x the reference "
                f"loss {ref_loss:.4g}"
            )
        if val_loss > limit:
            return (
                f"validation loss {val_loss:.4g} > {self.explode_factor:g} x the reference "
                f"loss {ref_loss:.4g}"
            )
        return None


def score_noise(scores: Sequence[float], n_val: int | None = None, n_classes: int = 0) -> float:
    """The noise of a normalised validation score, from a run's scores so far
    (the untrained model's first, the one being judged last).

    The larger of the standard error implied by the validation size (accuracy:
    ``sqrt(p (1 - p) / n)`` at the best score, chance-normalised like the score)
    and the spread of the interval-to-interval changes between the first and the
    last score (their standard deviation / sqrt 2; the jump from the untrained
    model and the change being judged are left out).
    """
    noise = NOISE_FLOOR
    if n_val and n_classes >= 2 and scores:
        chance = 1.0 / n_classes
        acc = min(max(max(scores) * (1 - chance) + chance, 0.0), 1.0)
        noise = max(noise, math.sqrt(acc * (1 - acc) / n_val) / (1 - chance))
    past = list(scores[1:-1])
    diffs = [b - a for a, b in zip(past[:-1], past[1:], strict=True)]
    if len(diffs) >= 2:
        mean = sum(diffs) / len(diffs)
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
        noise = max(noise, sd / math.sqrt(2))
    return noise


@dataclass(frozen=True)
class CollapseRule:
    """The validation score fell below its best by more than ``k`` x its noise
    (:func:`score_noise`); the caller restores the best state and backs off."""

    k: float = COLLAPSE_K
    lr_cap: float = 0.5
    """After a collapse the lr is capped at this x the lr that produced the best state."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.k) and self.k > 0):
            raise ValueError(f"collapse k must be a finite number > 0, got {self.k!r}")
        if not 0 < self.lr_cap <= 1:
            raise ValueError(f"collapse lr_cap must be in (0, 1], got {self.lr_cap!r}")

    def check(
        self, scores: Sequence[float], n_val: int | None = None, n_classes: int = 0
    ) -> str | None:
        """Why the last score counts as a collapse, or None."""
        if len(scores) < 2:
            return None
        if not (n_val and n_classes >= 2) and len(scores) < 5:
            # No verdict while the noise is unknown: without the validation size it
            # comes from the spread of past changes, which needs two of them.
            return None
        best, cur = max(scores), scores[-1]
        noise = score_noise(scores, n_val, n_classes)
        if best < self.k * noise:
            # Nothing learned beyond noise yet (the score is 0 at chance): nothing to
            # protect. Without this a wobble near chance before a phase transition
            # (parity tasks) restored and capped a run that was about to learn.
            return None
        if best - cur > self.k * noise:
            return (
                f"validation score {cur:.4g} fell {best - cur:.4g} below its best {best:.4g} "
                f"(> {self.k:g} x noise {noise:.3g})"
            )
        return None
