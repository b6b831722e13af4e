"""Live-tunable training runs."""

from __future__ import annotations

from typing import Any

from rlhpo.tasks.datasets import load_data
from rlhpo.tasks.models import build_model
from rlhpo.tasks.spec import TaskSpec
from rlhpo.trainees.trainee import IntervalStats, SchedulerFactory, Trainee, score_of

__all__ = ["IntervalStats", "Trainee", "build_trainee", "score_of"]


def build_trainee(
    spec: TaskSpec,
    hp: dict[str, Any] | None = None,
    seed: int = 0,
    scheduler: SchedulerFactory | None = None,
) -> Trainee:
    """A fresh run of ``spec``: its data (split once per task), a model initialised
    from ``seed``, and the starting hyperparameters ``hp`` (the task default if None)."""
    import torch

    data = load_data(
        spec.dataset, spec.dataset_args, spec.data_seed, spec.val_fraction, spec.test_fraction
    )
    hp = dict(spec.default if hp is None else {**spec.default, **hp})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = build_model(spec.model, spec.model_args, data, dropout=float(hp["dropout"]))
    return Trainee(
        model,
        data,
        metric=spec.metric,
        space=spec.space,
        hp=hp,
        optimizer=spec.optimizer,
        seed=seed,
        scheduler=scheduler,
    )
