"""Residual learning-rate control: the policy moves a *level* over a fixed schedule.

With a base schedule the policy no longer sets the learning rate itself. It sets a
level, which starts at the schedule's tuned peak (for the run's optimizer kind),
and each interval trains at ``level x m`` where ``m`` is the warm-up + cosine shape
averaged over the interval. The policy's "keep" action therefore reproduces the
calibrated warm-up + cosine schedule (piecewise constant per interval), and its
other actions are corrections relative to it (residual policy learning, Silver et
al. 2018, Johannink et al. 2019): a policy that learned nothing does no worse than
the best fixed schedule, instead of wandering.

Where the level starts is ``base_peak``'s choice:

- ``"tuned"`` (default): the schedule's tuned peak for the run's optimizer kind;
  the run's own starting learning rate is replaced (a residual policy owns the
  learning rate from the first interval on). Right for training from scratch.
- ``"user"``: the run's starting learning rate x ``peak_factor``. The user's lr
  then carries information: a fine-tuning run started at 3e-5 peaks near 3e-5,
  where a tuned from-scratch peak (Adam 0.02) would wreck a pretrained body.

One implementation (:meth:`BaseSchedule.start_level`, :meth:`BaseSchedule.lr`) serves
the environment (:class:`rlhpo.env.HPOEnv`) and the
:class:`rlhpo.controller.Controller`, and the policy file records the schedule (kind,
peaks, base_peak and peak_factor), so a policy always runs over the schedule it was
trained with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from rlhpo.baselines.schedules import WARMUP_FRACTION, WARMUP_START, optimizer_kind

KINDS = ("warmup-cosine",)
OPTIMIZER_KINDS = ("adam", "sgd")
BASE_PEAKS = ("tuned", "user")
#: Bounds of ``peak_factor``: the user's lr x at most 1000 (or / 1000).
PEAK_FACTOR_LIMITS = (1e-3, 1e3)
#: Points of the midpoint rule that averages the shape over one interval.
_POINTS = 8


class BaseScheduleError(ValueError):
    """A base schedule that is malformed (unknown kind, bad peak, ...)."""


@dataclass(frozen=True)
class BaseSchedule:
    """Warm-up + cosine, as a function of the budget fraction, with one peak per
    optimizer kind (``adam`` for Adam/AdamW, ``sgd`` for SGD with momentum).

    ``base_peak`` says where the level starts: ``"tuned"`` at ``peaks`` (the run's
    lr is replaced) or ``"user"`` at the run's starting lr x ``peak_factor`` (the
    peaks are then unused). ``peak_factor`` must be 1 with ``"tuned"``.
    """

    peaks: tuple[tuple[str, float], ...]
    kind: str = "warmup-cosine"
    warmup: float = WARMUP_FRACTION
    start: float = WARMUP_START
    source: str = ""
    base_peak: str = "tuned"
    peak_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BaseScheduleError(
                f"base_schedule kind must be one of {', '.join(KINDS)}, got {self.kind!r}"
            )
        peaks = tuple((str(k), float(v)) for k, v in dict(self.peaks).items())
        if not peaks:
            raise BaseScheduleError("base_schedule needs at least one peak, got none")
        for k, v in peaks:
            if k not in OPTIMIZER_KINDS:
                raise BaseScheduleError(
                    f"base_schedule peak for {k!r}: optimizer kinds are {', '.join(OPTIMIZER_KINDS)}"
                )
            if not (math.isfinite(v) and 0 < v <= 10):
                raise BaseScheduleError(
                    f"base_schedule peak for {k!r} must be in (0, 10], got {v!r}"
                )
        object.__setattr__(self, "peaks", peaks)
        if not (0 <= self.warmup < 1):
            raise BaseScheduleError(f"base_schedule warmup must be in [0, 1), got {self.warmup!r}")
        if not (0 < self.start <= 1):
            raise BaseScheduleError(f"base_schedule start must be in (0, 1], got {self.start!r}")
        if self.base_peak not in BASE_PEAKS:
            raise BaseScheduleError(
                f"base_schedule base_peak must be one of {', '.join(BASE_PEAKS)}, "
                f"got {self.base_peak!r}"
            )
        f = self.peak_factor
        lo, hi = PEAK_FACTOR_LIMITS
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (lo <= f <= hi):
            raise BaseScheduleError(
                f"base_schedule peak_factor must be a number in [{lo:g}, {hi:g}], got {f!r}"
            )
        object.__setattr__(self, "peak_factor", float(f))
        if self.base_peak == "tuned" and self.peak_factor != 1.0:
            raise BaseScheduleError(
                f"base_schedule peak_factor applies to base_peak 'user' only; with 'tuned' it "
                f"must be 1, got {self.peak_factor!r}"
            )

    # -- construction ------------------------------------------------------
    @classmethod
    def tuned(cls, suite_name: str) -> BaseSchedule:
        """The warm-up + cosine schedule whose peaks were tuned on ``suite_name``'s
        train split (``rlhpo/baselines/calibrated/warmup_cosine.json``): the same
        peaks the ``warmup-cosine`` baseline of ``rlhpo compare`` runs with."""
        from rlhpo.baselines.schedules import tuned_peak

        peaks, sources = {}, set()
        for k in OPTIMIZER_KINDS:
            peaks[k], src = tuned_peak(suite_name, k)
            sources.add(src.replace(f" for {k}", ""))
        return cls(tuple(peaks.items()), source="; ".join(sorted(sources)))

    @classmethod
    def of(cls, value: Any, suite_name: str = "default") -> BaseSchedule | None:
        """``None``/``"none"`` (off), ``"warmup-cosine"`` (tuned on ``suite_name``), a
        :class:`BaseSchedule`, or its JSON form (a policy manifest's)."""
        if value is None or value == "none" or value == "":
            return None
        if isinstance(value, BaseSchedule):
            return value
        if isinstance(value, str):
            if value not in KINDS:
                raise BaseScheduleError(
                    f"base_schedule must be none or one of {', '.join(KINDS)}, got {value!r}"
                )
            return cls.tuned(suite_name)
        if isinstance(value, dict):
            return cls.from_json(value)
        raise BaseScheduleError(
            f"base_schedule must be a name, a mapping or None, got {type(value).__name__}"
        )

    def with_peak(
        self, base_peak: str | None = None, peak_factor: float | None = None
    ) -> BaseSchedule:
        """The same schedule starting its level elsewhere: ``base_peak`` ``"tuned"`` or
        ``"user"`` (a ``peak_factor`` alone means ``"user"``); None keeps this one's.
        The Controller's and ``rlhpo compare``'s overrides both come through here."""
        if base_peak is None and peak_factor is None:
            return self
        peak = base_peak or ("user" if peak_factor is not None else self.base_peak)
        factor = 1.0 if peak_factor is None else peak_factor
        return replace(self, base_peak=peak, peak_factor=factor)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "peaks": dict(self.peaks),
            "warmup": self.warmup,
            "start": self.start,
            "source": self.source,
            "base_peak": self.base_peak,
            "peak_factor": self.peak_factor,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BaseSchedule:
        if not isinstance(d, dict):
            raise BaseScheduleError(f"base_schedule must be an object, got {type(d).__name__}")
        known = {"kind", "peaks", "warmup", "start", "source", "base_peak", "peak_factor"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BaseScheduleError(f"base_schedule has unknown keys {unknown}")
        peaks = d.get("peaks")
        if not isinstance(peaks, dict):
            raise BaseScheduleError(
                f"base_schedule peaks must be an object {{kind: lr}}, got {peaks!r}"
            )
        try:
            return cls(
                tuple((str(k), float(v)) for k, v in peaks.items()),
                kind=str(d.get("kind", "warmup-cosine")),
                warmup=float(d.get("warmup", WARMUP_FRACTION)),
                start=float(d.get("start", WARMUP_START)),
                source=str(d.get("source", "")),
                # Files written before base_peak existed started at the tuned peak.
                base_peak=d.get("base_peak", "tuned"),
                peak_factor=d.get("peak_factor", 1.0),
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, BaseScheduleError):
                raise
            raise BaseScheduleError(f"base_schedule: {e}") from None

    # -- the schedule ------------------------------------------------------
    def peak(self, optimizer: str) -> float:
        """The starting level for a run with ``optimizer`` (``adam``, ``adamw``, ``sgd``
        or a torch optimizer's class name)."""
        peaks = dict(self.peaks)
        kind = optimizer_kind(optimizer)
        return peaks.get(kind, peaks.get("adam", next(iter(peaks.values()))))

    def start_level(self, optimizer: str, user_lr: float) -> float:
        """Where the level starts for a run with ``optimizer`` that the user started at
        ``user_lr``: the tuned peak, or ``user_lr x peak_factor`` (``base_peak="user"``).
        The env and the Controller both start here."""
        if self.base_peak == "user":
            lr = float(user_lr)
            if not (math.isfinite(lr) and lr > 0):
                raise BaseScheduleError(
                    f"base_peak 'user' needs the run's starting lr > 0, got {user_lr!r}"
                )
            return lr * self.peak_factor
        return self.peak(optimizer)

    def shape(self, frac: float) -> float:
        """The multiplier of the level at budget fraction ``frac`` (1 at the peak)."""
        f = min(max(frac, 0.0), 1.0)
        if self.warmup > 0 and f < self.warmup:
            return self.start + (1.0 - self.start) * f / self.warmup
        t = (f - self.warmup) / max(1.0 - self.warmup, 1e-12)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    def interval_multiplier(self, frac0: float, frac1: float) -> float:
        """The shape averaged over the interval ``[frac0, frac1]`` of the budget: the
        constant multiplier an interval trains with."""
        if frac1 <= frac0:
            return self.shape(frac0)
        h = (frac1 - frac0) / _POINTS
        return sum(self.shape(frac0 + (i + 0.5) * h) for i in range(_POINTS)) / _POINTS

    def lr(self, level: float, samples: int, next_samples: int, budget: int) -> float:
        """The learning rate of the interval of ``next_samples`` samples that starts
        after ``samples`` of ``budget``, at ``level``."""
        b = max(int(budget), 1)
        return level * self.interval_multiplier(samples / b, min(samples + next_samples, b) / b)

    def describe(self) -> str:
        peaks = ", ".join(f"{k} {v:g}" for k, v in self.peaks)
        if self.base_peak == "user":
            peaks = f"the run's starting lr x {self.peak_factor:g}"
        return (
            f"{self.kind} (peak {peaks}; warm-up over {self.warmup:.0%} of the budget from "
            f"peak x {self.start:g}, then cosine to 0; one lr per interval)"
        )
