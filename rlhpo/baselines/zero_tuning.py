"""The learning-rate-free optimizers a user picks to avoid tuning, run as a user would.

- ``schedulefree``: Schedule-Free AdamW (``schedulefree.AdamWScheduleFree``), its
  documented default lr 0.0025 and a linear warm-up over the first 5% of the
  run's optimizer steps (its ``warmup_steps``; the package recommends warm-up
  instead of a schedule). It must be in ``eval()`` mode when the model is
  evaluated and in ``train()`` mode while it trains: every evaluation switches.
- ``prodigy``: Prodigy (``prodigyopt.Prodigy``), lr 1.0 as its authors
  recommend, no schedule.
- ``dadapt``: D-Adaptation Adam (``dadaptation.DAdaptAdam``), lr 1.0 as its
  authors recommend, no schedule.

Everything else is the library default (betas, eps, weight decay 0). Each run
uses the task's default batch size and dropout, its sample budget and interval
structure (:func:`rlhpo.baselines.single.run_single`). The lr knob is ignored: no
controller drives these runs, and ``set_hp(lr=...)`` leaves the optimizer alone.
The traced ``lr`` is the step size the optimizer actually uses (``d * lr`` for
Prodigy and D-Adaptation, the warmed-up lr for Schedule-Free).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhpo.tasks.spec import TaskSpec
from rlhpo.trainees import SchedulerFactory, Trainee, init_model, task_data

ZERO_TUNING = ("schedulefree", "prodigy", "dadapt")
SCHEDULEFREE_LR = 0.0025  # schedulefree.AdamWScheduleFree's documented default
SCHEDULEFREE_WARMUP = 0.05  # fraction of the run's optimizer steps
_PACKAGES = {"schedulefree": "schedulefree", "prodigy": "prodigyopt", "dadapt": "dadaptation"}


def check_zero_tuning(name: str) -> None:
    """Raise ValueError naming the bad value unless ``name`` is a known method
    whose package imports (with the command that installs it)."""
    if name not in ZERO_TUNING:
        raise ValueError(
            f"zero-tuning optimizer must be one of {', '.join(ZERO_TUNING)}, got {name!r}"
        )
    import importlib.util

    pkg = _PACKAGES[name]
    if importlib.util.find_spec(pkg) is None:
        raise ValueError(f"{name} needs the package {pkg!r}: pip install {pkg}")


def make_optimizer(name: str, params, total_steps: int) -> torch.optim.Optimizer:
    """The optimizer ``name`` with its library-recommended settings."""
    check_zero_tuning(name)
    if name == "schedulefree":
        from schedulefree import AdamWScheduleFree

        warmup = max(1, int(round(SCHEDULEFREE_WARMUP * total_steps)))
        return AdamWScheduleFree(params, lr=SCHEDULEFREE_LR, warmup_steps=warmup)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=1.0)
    from dadaptation import DAdaptAdam

    return DAdaptAdam(params, lr=1.0)


class ZeroTuningTrainee(Trainee):
    """A :class:`Trainee` whose optimizer is one of :data:`ZERO_TUNING`."""

    def __init__(self, *args: Any, method: str, total_steps: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.method = method
        self.optimizer = make_optimizer(method, self.model.parameters(), total_steps)
        self._train_mode()

    def _train_mode(self) -> None:
        if self.method == "schedulefree":
            self.optimizer.train()

    def _eval_mode(self) -> None:
        if self.method == "schedulefree":
            self.optimizer.eval()

    @property
    def hp(self) -> dict[str, Any]:
        g = self.optimizer.param_groups[0]
        lr = float(g["lr"]) * float(g.get("d", 1.0))
        if self.method == "schedulefree":
            lr = float(g.get("scheduled_lr") or 0.0) or float(g["lr"])
        return {**super().hp, "lr": lr}

    def set_hp(self, **values: Any) -> dict[str, Any]:
        values.pop("lr", None)  # these optimizers set their own step size
        return super().set_hp(**values)

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict[str, float]:
        # Schedule-Free evaluates the averaged weights: eval() swaps them in, train() back.
        self._eval_mode()
        try:
            return super().evaluate(split)
        finally:
            self._train_mode()


def zero_tuning_hp(spec: TaskSpec) -> dict[str, Any]:
    """The task's default batch size and dropout (the lr is the optimizer's own)."""
    return dict(spec.default)


def trainee_factory(method: str):
    """A ``build`` function for :func:`rlhpo.baselines.single.run_single`."""
    check_zero_tuning(method)

    def build(
        spec: TaskSpec, hp: dict[str, Any], seed: int, scheduler: SchedulerFactory | None
    ) -> Trainee:
        hp = {**spec.default, **hp}
        data = task_data(spec)
        model = init_model(spec, data, hp["dropout"], seed)
        total_steps = math.ceil(spec.budget_samples / int(hp["batch_size"]))
        return ZeroTuningTrainee(
            model,
            data,
            metric=spec.metric,
            space=spec.space,
            hp=hp,
            optimizer=spec.optimizer,
            seed=seed,
            method=method,
            total_steps=total_steps,
        )

    return build


def run_zero_tuning(spec: TaskSpec, method: str, seed: int):
    """One run of ``spec`` with the zero-tuning optimizer ``method`` (a ``RunOutcome``)."""
    from rlhpo.baselines.single import run_single

    return run_single(spec, zero_tuning_hp(spec), seed, build=trainee_factory(method))
