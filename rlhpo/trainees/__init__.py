"""Live-tunable training runs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlhpo.knobs import DROPOUT
from rlhpo.tasks.datasets import TaskData, load_data
from rlhpo.tasks.models import build_model
from rlhpo.tasks.spec import TaskSpec
from rlhpo.trainees.trainee import (
    IntervalStats,
    SampleOrder,
    SchedulerFactory,
    Trainee,
    score_of,
)

__all__ = [
    "IntervalStats",
    "SampleOrder",
    "Trainee",
    "build_trainee",
    "init_model",
    "score_of",
    "task_data",
]


def task_data(spec: TaskSpec) -> TaskData:
    """The task's train/val/test tensors (split once per task, cached in-process)."""
    return load_data(
        spec.dataset, spec.dataset_args, spec.data_seed, spec.val_fraction, spec.test_fraction
    )


def init_model(spec: TaskSpec, data: TaskData, dropout: float, seed: int) -> nn.Module:
    """The task's model, initialised from ``seed`` without touching the global RNG.

    Every backend builds its models here, so one seed gives one initialisation
    whether the run is trained alone or batched with others.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = build_model(spec.model, spec.model_args, data, dropout=float(dropout))
    if spec.pretrain:  # fine-tuning: the pretrained body under a head initialised from seed
        from rlhpo.trainees.pretrained import cached_body, load_body

        load_body(model, cached_body(spec), spec.name)
    return model


def build_trainee(
    spec: TaskSpec,
    hp: dict[str, Any] | None = None,
    seed: int = 0,
    scheduler: SchedulerFactory | None = None,
) -> Trainee:
    """A fresh run of ``spec``: its data (split once per task), a model initialised
    from ``seed``, and the starting hyperparameters ``hp`` (the task default if None)."""
    data = task_data(spec)
    hp = dict(spec.default if hp is None else {**spec.default, **hp})
    model = init_model(spec, data, hp[DROPOUT.name], seed)
    return Trainee(
        model,
        data,
        metric=spec.metric,
        space=spec.space,
        hp=hp,
        optimizer=spec.optimizer,
        seed=seed,
        scheduler=scheduler,
        weight_decay=spec.weight_decay,
    )
