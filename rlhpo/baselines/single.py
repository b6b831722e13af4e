"""One training run of a task, interval by interval, with the same structure as an
``HPOEnv`` episode: evaluate the untrained model, then for each interval let an
optional controller change the knobs, train one interval, evaluate on validation.

Static runs, schedules, the plateau controller and every Optuna trial go through
:func:`run_single`, so all of them share the env's interval structure, its
divergence rule (:class:`rlhpo.safety.DivergenceRule`: a divergence ends the run
with the score counted as chance) and its cost accounting (samples, optimizer
steps, wall time).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlhpo.observation import MetricHistory, Record, normalised_score
from rlhpo.safety import EXPLODE_FACTOR, DivergenceRule
from rlhpo.tasks.datasets import load_data
from rlhpo.tasks.spec import TaskSpec
from rlhpo.trainees import SchedulerFactory, Trainee, build_trainee


class IntervalController(Protocol):
    """Decides the knobs for the next interval from what was observed so far."""

    def decide(self, history: MetricHistory, hp: dict[str, Any]) -> dict[str, Any]:
        """Knob values for the next interval (only the ones to change are needed)."""
        ...


@dataclass
class RunOutcome:
    """What one run did and reached. Scores: ``*_score`` raw metric, ``*_norm`` normalised."""

    val_score: float
    val_norm: float
    test_score: float | None
    test_norm: float | None
    samples: int
    optimizer_steps: int
    wall_time: float  # seconds: building the run, training, validation, controller
    train_time: float  # seconds inside Trainee.train / evaluate (val)
    diverged: bool
    hp: dict[str, Any]
    intervals: int
    trace: list[dict[str, Any]] = field(default_factory=list)


_WARM = False


def preload(spec: TaskSpec) -> None:
    """Build the task's data once in this process, and pay torch's one-off import of
    its optimizer machinery (about a second), so that no run's wall time includes them."""
    global _WARM
    load_data(
        spec.dataset, spec.dataset_args, spec.data_seed, spec.val_fraction, spec.test_fraction
    )
    if not _WARM:
        import torch

        w = torch.zeros(2, requires_grad=True)
        opt = torch.optim.Adam([w])
        (w.sum() ** 2).backward()
        opt.step()
        _WARM = True


def trace_row(
    interval: int, rec: Record, tr: Trainee, raw_val: float, t0: float, diverged: bool
) -> dict[str, Any]:
    """One row of a learning-curve trace (shared by every method)."""
    return {
        "interval": interval,
        "samples": tr.samples_seen,
        "optimizer_steps": tr.optimizer_steps,
        "wall_time": time.perf_counter() - t0,
        "val_score": raw_val,
        "norm_val_score": rec.val_score,
        "val_loss": rec.val_loss,
        "train_loss": rec.train_loss,
        **rec.hp,
        "diverged": diverged,
    }


def run_single(
    spec: TaskSpec,
    hp: dict[str, Any],
    seed: int,
    *,
    controller: IntervalController | None = None,
    scheduler: SchedulerFactory | None = None,
    explode_factor: float = EXPLODE_FACTOR,
    on_interval: Callable[[int, Record, Trainee], None] | None = None,
    evaluate_test: bool = True,
    build: Callable[[TaskSpec, dict[str, Any], int, SchedulerFactory | None], Trainee]
    | None = None,
) -> RunOutcome:
    """Train ``spec`` from ``hp`` with trainee seed ``seed`` (pass
    ``rlhpo.env.run_seed_for(s)`` to match ``HPOEnv.reset(seed=s)``).

    ``on_interval(i, record, trainee)`` is called after each interval's evaluation
    and may raise (Optuna pruning does); the test split is evaluated once at the
    end, outside the timed part, for reporting only. ``build(spec, hp, seed,
    scheduler)`` replaces :func:`build_trainee` (another optimizer, for example).
    """
    guard = DivergenceRule(explode_factor)
    preload(spec)
    t0 = time.perf_counter()
    if build is None:
        tr = build_trainee(spec, hp, seed=seed, scheduler=scheduler)
    else:
        tr = build(spec, hp, seed, scheduler)
    n_classes = tr.data.n_classes

    def norm(raw: float) -> float:
        return normalised_score(spec.metric, raw, n_classes)

    history = MetricHistory()
    ev = tr.evaluate("val")
    ref_loss = ev["loss"]
    rec = history.record(
        val_loss=ev["loss"],
        val_score=norm(ev["score"]),
        train_loss=None,
        hp=tr.hp,
        budget_fraction=0.0,
    )
    trace = [trace_row(0, rec, tr, ev["score"], t0, False)]
    diverged, interval = False, 0
    while tr.samples_seen < spec.budget_samples:
        if controller is not None:
            tr.set_hp(**controller.decide(history, tr.hp))
        n = min(spec.interval_samples, spec.budget_samples - tr.samples_seen)
        stats = tr.train(n)
        interval += 1
        loss = stats.train_loss
        ev = tr.evaluate("val")
        diverged = guard.check(ref_loss, loss, ev["loss"], stopped=stats.diverged) is not None
        rec = history.record(
            val_loss=ev["loss"] if math.isfinite(ev["loss"]) else 1e6,
            val_score=0.0 if diverged else norm(ev["score"]),
            train_loss=loss if math.isfinite(loss) else 1e6,
            hp=tr.hp,
            budget_fraction=tr.samples_seen / spec.budget_samples,
        )
        trace.append(trace_row(interval, rec, tr, ev["score"], t0, diverged))
        if on_interval is not None:
            on_interval(interval, rec, tr)
        if diverged:
            break
    wall = time.perf_counter() - t0
    train_time = tr.wall_time
    test_raw = test_norm = None
    if evaluate_test:
        test_raw = tr.evaluate("test")["score"]
        test_norm = 0.0 if diverged else norm(test_raw)
    return RunOutcome(
        val_score=ev["score"],
        val_norm=rec.val_score,
        test_score=test_raw,
        test_norm=test_norm,
        samples=tr.samples_seen,
        optimizer_steps=tr.optimizer_steps,
        wall_time=wall,
        train_time=train_time,
        diverged=diverged,
        hp=tr.hp,
        intervals=interval,
        trace=trace,
    )
