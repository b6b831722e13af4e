"""The knob registry, the search space built on it, and the knobs' effect on a live run.

Every tunable hyperparameter is declared once here, as a small frozen
:class:`Knob` registered in :data:`REGISTRY`: its domain (float on a linear or
log scale, or a list of allowed integers), how it is read from and written to a
live run (optimizer param groups and LR scheduler base values, the batch-size
setter, dropout modules), the relative moves an action can make, and its Optuna
and Ray Tune domains. :class:`SearchSpace`, the action codec, the env's start
draw, policy manifests, PBT mutations, the Optuna baseline and the integrations
all derive from it, so adding a knob is one class and one registry line here.

The first three knobs (lr, batch size, dropout) are required in every space;
the others are opt-in: a suite's ``space`` table names them.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

log = logging.getLogger("rlhpo.knobs")


class KnobError(ValueError):
    """An unknown knob name or an unusable value (e.g. NaN)."""


@dataclass
class LiveRun:
    """The handles of a running training job that knobs read and write.

    ``set_batch_size(b)`` returns the batch size actually in force (or None when
    it is ``b``); ``get_batch_size()`` reads it.
    """

    optimizer: Any | None = None
    scheduler: Any | None = None
    model: nn.Module | None = None
    get_batch_size: Callable[[], int] | None = None
    set_batch_size: Callable[[int], int | None] | None = None


# -- knobs -----------------------------------------------------------------------


@dataclass(frozen=True)
class Knob(abc.ABC):
    """One tunable hyperparameter: domain, action moves, live read/write, search domains.

    ``kind`` is ``"float"`` (bounds ``(low, high)``, on a log scale when ``log``)
    or ``"choice"`` (an increasing tuple of allowed integers, moved along in log2).
    ``moves`` are the action's choices: factors (``move="mul"``), added amounts
    (``"add"``) or steps along the list (``"index"``); ``moves[noop]`` keeps the value.
    ``limits`` bound what a suite may declare.
    """

    name: str
    kind: str
    log: bool
    move: str
    moves: tuple[float, ...]
    noop: int
    limits: tuple[float, float]
    required: bool = False
    summary: str = ""

    # -- domain ---------------------------------------------------------------
    def check_bounds(self, bounds: Any) -> tuple:
        """Validated bounds of this knob in a space (a one-line error otherwise)."""
        lo_ok, hi_ok = self.limits
        if self.kind == "choice":
            v = list(bounds) if isinstance(bounds, (list, tuple)) else None
            if not v or not all(
                isinstance(x, (int,)) and not isinstance(x, bool) and lo_ok <= x <= hi_ok for x in v
            ):
                raise KnobError(
                    f"{self.name} must be a non-empty list of integers in "
                    f"[{lo_ok:g}, {hi_ok:g}], got {bounds!r}"
                )
            if v != sorted(set(v)):
                raise KnobError(f"{self.name} must be strictly increasing, got {bounds!r}")
            return tuple(int(x) for x in v)
        v = list(bounds) if isinstance(bounds, (list, tuple)) else None
        if (
            v is None
            or len(v) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        ):
            raise KnobError(f"{self.name} must be [low, high], got {bounds!r}")
        lo, hi = float(v[0]), float(v[1])
        if not lo <= hi:
            raise KnobError(f"{self.name} is inverted: {bounds!r}")
        if lo < lo_ok or hi > hi_ok or (self.log and lo <= 0):
            raise KnobError(f"{self.name} must lie in [{lo_ok:g}, {hi_ok:g}], got {bounds!r}")
        return (lo, hi)

    def contains(self, bounds: tuple, value: Any) -> bool:
        if self.kind == "choice":
            return int(value) in bounds
        return bounds[0] <= value <= bounds[1]

    def describe(self, bounds: tuple) -> str:
        if self.kind == "choice":
            return str(list(bounds))
        return f"[{bounds[0]:g}, {bounds[1]:g}]" + (" (log)" if self.log else "")

    def clip(self, bounds: tuple, value: Any) -> float | int:
        """The value moved into bounds (a choice knob: the nearest allowed value in log2)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise KnobError(f"{self.name} must be a number, got {value!r}")
        if self.kind == "choice":
            v = max(float(value), 1.0)
            return min(bounds, key=lambda b: abs(math.log2(b) - math.log2(v)))
        return float(min(max(float(value), bounds[0]), bounds[1]))

    def to_unit(self, bounds: tuple, value: float) -> float:
        """Position of a value inside the bounds, in [0, 1] (log for log knobs and choices)."""
        if self.kind == "choice":
            lo, hi = math.log2(bounds[0]), math.log2(bounds[-1])
            return 0.5 if hi == lo else (math.log2(value) - lo) / (hi - lo)
        if self.log:
            lo, hi = math.log(bounds[0]), math.log(bounds[1])
            return (math.log(value) - lo) / (hi - lo)
        lo, hi = bounds
        return (value - lo) / (hi - lo)

    def lowest(self, bounds: tuple) -> float | int:
        return bounds[0]

    def highest(self, bounds: tuple) -> float | int:
        return bounds[-1]

    def draw(self, rng: Any, bounds: tuple) -> float | int:
        """A start value from a numpy ``Generator``: log-uniform, uniform or one of the list."""
        if self.kind == "choice":
            return int(bounds[int(rng.integers(len(bounds)))])
        if self.log:
            return float(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))
        return float(rng.uniform(bounds[0], bounds[1]))

    # -- actions --------------------------------------------------------------
    def step(self, bounds: tuple, value: Any, choice: int) -> float | int:
        """The value after action choice ``choice`` (clipped to the bounds)."""
        m = self.moves[choice]
        if self.move == "index":
            i = bounds.index(self.clip(bounds, value))
            return bounds[min(max(i + int(m), 0), len(bounds) - 1)]
        if self.move == "mul":
            return self.clip(bounds, value * m)
        return self.clip(bounds, value + m)

    # -- search baselines -----------------------------------------------------
    def suggest(self, trial: Any, bounds: tuple) -> Any:
        """Optuna's ``trial.suggest_*`` over this knob's domain."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(bounds))
        return trial.suggest_float(self.name, bounds[0], bounds[1], log=self.log)

    def tune_mutation(self, tune: Any, bounds: tuple) -> Any:
        """Ray Tune's PBT mutation domain (a list resamples from it, as Tune's PBT does)."""
        if self.kind == "choice":
            return list(bounds)
        return (tune.loguniform if self.log else tune.uniform)(bounds[0], bounds[1])

    def tune_initial(self, tune: Any, bounds: tuple) -> Any:
        """Ray Tune's domain for the population's first draw."""
        if self.kind == "choice":
            return tune.choice(list(bounds))
        return self.tune_mutation(tune, bounds)

    # -- a live run -------------------------------------------------------------
    @abc.abstractmethod
    def read(self, run: LiveRun) -> Any | None:
        """The value in force in ``run`` (None when the run has nothing to read it from)."""

    @abc.abstractmethod
    def write(self, run: LiveRun, value: Any) -> Any:
        """Apply ``value`` to ``run``; returns the value now in force."""


@dataclass(frozen=True)
class LearningRate(Knob):
    """Every param group's lr; a scheduler's base values move with it."""

    def read(self, run: LiveRun) -> float | None:
        return get_learning_rate(run.optimizer) if run.optimizer is not None else None

    def write(self, run: LiveRun, value: Any) -> float:
        if run.optimizer is not None:
            set_learning_rate(run.optimizer, float(value), run.scheduler)
        return float(value)


@dataclass(frozen=True)
class BatchSize(Knob):
    """Samples per optimizer step, through the run's batch-size setter (sampler,
    accumulation, or the trainee's own batching)."""

    def read(self, run: LiveRun) -> int | None:
        return int(run.get_batch_size()) if run.get_batch_size is not None else None

    def write(self, run: LiveRun, value: Any) -> int:
        b = int(value)
        if run.set_batch_size is not None:
            got = run.set_batch_size(b)
            b = int(got) if got is not None else b
        return b


@dataclass(frozen=True)
class Dropout(Knob):
    """``p`` of every dropout module (and Hugging Face config dropout fields)."""

    def read(self, run: LiveRun) -> float | None:
        return get_dropout(run.model) if run.model is not None else None

    def write(self, run: LiveRun, value: Any) -> float:
        if run.model is not None:
            set_dropout(run.model, float(value))
        return float(value)


@dataclass(frozen=True)
class WeightDecay(Knob):
    """Every param group's ``weight_decay``, except no-decay groups (bias, norms):
    a group at 0 while another group decays keeps 0."""

    def read(self, run: LiveRun) -> float | None:
        if run.optimizer is None:
            return None
        return max(float(g.get("weight_decay", 0.0)) for g in run.optimizer.param_groups)

    def write(self, run: LiveRun, value: Any) -> float:
        v = float(value)
        if not (math.isfinite(v) and v >= 0):
            raise KnobError(f"weight_decay must be a finite number >= 0, got {value!r}")
        if run.optimizer is not None:
            groups = run.optimizer.param_groups
            decaying = [g for g in groups if g.get("weight_decay", 0.0) > 0]
            for g in decaying if decaying and len(decaying) < len(groups) else groups:
                g["weight_decay"] = v
        return v


@dataclass(frozen=True)
class Momentum(Knob):
    """SGD's ``momentum`` or Adam's ``beta1``, where the optimizer has one."""

    def read(self, run: LiveRun) -> float | None:
        if run.optimizer is None:
            return None
        g = run.optimizer.param_groups[0]
        if "betas" in g:
            return float(g["betas"][0])
        if "momentum" in g:
            return float(g["momentum"])
        return None

    def write(self, run: LiveRun, value: Any) -> float:
        v = float(value)
        if not 0.0 <= v < 1.0:
            raise KnobError(f"momentum must be in [0, 1), got {value!r}")
        if run.optimizer is not None:
            for g in run.optimizer.param_groups:
                if "betas" in g:
                    g["betas"] = (v, *tuple(g["betas"])[1:])
                elif "momentum" in g:
                    g["momentum"] = v
                else:
                    raise KnobError(
                        f"momentum needs an optimizer with momentum or betas, got "
                        f"{type(run.optimizer).__name__}"
                    )
        return v


#: Every knob, in the order of action dimensions and observation features.
REGISTRY: dict[str, Knob] = {
    k.name: k
    for k in (
        LearningRate(
            "lr", "float", True, "mul", (0.25, 0.5, 1.0, 2.0, 4.0), 2, (1e-8, 10.0), True,
            "learning rate: x1/4, x1/2, x1, x2, x4",
        ),
        BatchSize(
            "batch_size", "choice", True, "index", (-1, 0, 1), 1, (1, 2**20), True,
            "batch size: one step down, stay, one step up the space's list",
        ),
        Dropout(
            "dropout", "float", False, "add", (-0.1, 0.0, 0.1), 1, (0.0, 0.95), True,
            "dropout: -0.1, 0, +0.1",
        ),
        WeightDecay(
            "weight_decay", "float", True, "mul", (0.25, 1.0, 4.0), 1, (1e-8, 1.0), False,
            "weight decay: x1/4, x1, x4",
        ),
        Momentum(
            "momentum", "float", False, "add", (-0.05, 0.0, 0.05), 1, (0.0, 0.999), False,
            "momentum (SGD) or beta1 (Adam): -0.05, 0, +0.05",
        ),
    )
}  # fmt: skip

#: The knobs every space has (and the only ones of every shipped policy).
KNOBS: tuple[str, ...] = tuple(n for n, k in REGISTRY.items() if k.required)
#: Every registered knob name.
ALL_KNOBS: tuple[str, ...] = tuple(REGISTRY)
#: The knobs that particular code needs by role (optimizer construction, lr caps).
LR: Knob = REGISTRY["lr"]
BATCH_SIZE: Knob = REGISTRY["batch_size"]
DROPOUT: Knob = REGISTRY["dropout"]


def check_knob(name: str) -> Knob:
    """The registered knob called ``name`` (a one-line error naming the known ones)."""
    knob = REGISTRY.get(name)
    if knob is None:
        raise KnobError(f"unknown knob {name!r}; knobs are {', '.join(ALL_KNOBS)}")
    return knob


def order_knobs(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` checked and put in registry order."""
    names = set(names)
    for n in names:
        check_knob(n)
    return tuple(n for n in ALL_KNOBS if n in names)


# -- the search space --------------------------------------------------------------


class SearchSpace:
    """Bounds of the tunable hyperparameters, one entry per knob it names.

    Built from knob names: ``SearchSpace(lr=(1e-4, 1e-1), batch_size=(32, 64),
    dropout=(0.0, 0.5))`` (``batch_sizes=`` is accepted for the batch-size list).
    The bounds are readable as attributes: ``space.lr``, ``space.batch_sizes``.
    Immutable and hashable.
    """

    _ALIASES: ClassVar[dict[str, str]] = {"batch_sizes": "batch_size"}

    def __init__(self, bounds: Mapping[str, Any] | None = None, **kwargs: Any):
        given = dict(bounds or {})
        for k, v in kwargs.items():
            given[self._ALIASES.get(k, k)] = v
        names = order_knobs(given)
        missing = [k for k in KNOBS if k not in given]
        if missing:
            raise KnobError(f"a search space needs the knobs {', '.join(missing)}")
        object.__setattr__(
            self, "_bounds", tuple((n, REGISTRY[n].check_bounds(given[n])) for n in names)
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("SearchSpace is immutable")

    def __getattr__(self, name: str) -> Any:
        key = self._ALIASES.get(name, name)
        for n, b in object.__getattribute__(self, "_bounds"):
            if n == key:
                return b
        raise AttributeError(f"this search space has no knob {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and self._bounds == other._bounds

    def __hash__(self) -> int:
        return hash(self._bounds)

    def __repr__(self) -> str:
        return type(self).__name__ + "(" + ", ".join(f"{n}={b!r}" for n, b in self._bounds) + ")"

    def __reduce__(self):
        return (type(self), (dict(self._bounds),))

    # -- by knob -------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The knobs of this space, in registry order."""
        return tuple(n for n, _ in self._bounds)

    @property
    def knobs(self) -> tuple[Knob, ...]:
        return tuple(REGISTRY[n] for n in self.names)

    def bounds(self, knob: str) -> tuple:
        self._knob(knob)
        return dict(self._bounds)[knob]

    def _knob(self, name: str) -> Knob:
        knob = check_knob(name)
        if name not in self.names:
            raise KnobError(f"knob {name!r} is not in this space ({', '.join(self.names)})")
        return knob

    def contains(self, knob: str, value: float) -> bool:
        return self._knob(knob).contains(self.bounds(knob), value)

    def describe(self, knob: str) -> str:
        return self._knob(knob).describe(self.bounds(knob))

    def clip(self, knob: str, value: float) -> float | int:
        """The value moved into bounds (batch size: the nearest allowed size in log2)."""
        return self._knob(knob).clip(self.bounds(knob), value)

    def clip_all(self, hp: dict[str, Any]) -> dict[str, Any]:
        return {k: self.clip(k, v) for k, v in hp.items()}

    def to_unit(self, knob: str, value: float) -> float:
        """Position of a value inside the bounds, in [0, 1] (log for log knobs and choices)."""
        return self._knob(knob).to_unit(self.bounds(knob), value)

    def step(self, knob: str, value: Any, choice: int) -> float | int:
        return self._knob(knob).step(self.bounds(knob), value, choice)

    # -- whole space ---------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        return {n: list(b) for n, b in self._bounds}

    def as_bounds(self) -> dict[str, tuple]:
        """Knob name -> bounds (a tuple), in registry order."""
        return dict(self._bounds)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchSpace:
        return cls(dict(d))

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample a configuration from an Optuna trial over exactly this space."""
        return {k.name: k.suggest(trial, self.bounds(k.name)) for k in self.knobs}

    def tune_mutations(self, tune: Any) -> dict[str, Any]:
        """Ray Tune PBT ``hyperparam_mutations`` over exactly this space."""
        return {k.name: k.tune_mutation(tune, self.bounds(k.name)) for k in self.knobs}

    def tune_initial(self, tune: Any) -> dict[str, Any]:
        """Ray Tune ``param_space`` entries for the first draw of a population."""
        return {k.name: k.tune_initial(tune, self.bounds(k.name)) for k in self.knobs}

    def draw(self, rng: Any, start: Mapping[str, tuple] | None = None) -> dict[str, Any]:
        """One start drawn from ``start`` bounds (default: the space's), knob by knob
        in registry order (so a seed gives the same draw whatever is added later)."""
        start = start or dict(self._bounds)
        return {k.name: k.draw(rng, start[k.name]) for k in self.knobs}

    def read(self, run: LiveRun) -> dict[str, Any]:
        """The values in force in ``run`` for the knobs it can report."""
        out = {}
        for k in self.knobs:
            v = k.read(run)
            if v is not None:
                out[k.name] = v
        return out

    def write(
        self, run: LiveRun, hp: Mapping[str, Any], skip: Iterable[str] = ()
    ) -> dict[str, Any]:
        """Apply ``hp`` (clipped to the space) to ``run``, leaving the ``skip`` knobs
        untouched. Returns the values written."""
        skip = set(skip)
        return {k: REGISTRY[k].write(run, self.clip(k, v)) for k, v in hp.items() if k not in skip}


# -- torch helpers used by the knobs --------------------------------------------------


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
