"""Baselines a learned tuning policy is measured against, all on the same task
specs, search space, sample budget and interval structure as the environment.

- :func:`run_single`: one run (static, a schedule, or a controller such as
  :class:`PlateauController`), interval by interval like an env episode;
- :mod:`~rlhpo.baselines.schedules`: cosine, step, warm-up + cosine;
- :func:`run_study`: Optuna TPE / random, with or without pruning;
- :func:`~rlhpo.baselines.pbt.run_pbt`: Ray Tune PBT (imported lazily: needs ``rlhpo[ray]``).
"""

from rlhpo.baselines.optuna_study import StudyOutcome, TrialRecord, run_study, trial_seed
from rlhpo.baselines.plateau import PlateauController
from rlhpo.baselines.schedules import (
    CosineDecay,
    LambdaSchedule,
    StepDecay,
    WarmupCosine,
    planned_steps,
    schedule_for,
    tuned_peak,
)
from rlhpo.baselines.single import IntervalController, RunOutcome, run_single

__all__ = [
    "CosineDecay",
    "IntervalController",
    "LambdaSchedule",
    "PlateauController",
    "RunOutcome",
    "StepDecay",
    "StudyOutcome",
    "TrialRecord",
    "WarmupCosine",
    "planned_steps",
    "run_single",
    "run_study",
    "schedule_for",
    "trial_seed",
    "tuned_peak",
]
