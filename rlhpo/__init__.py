"""rlhpo: learn how to tune a neural network while it trains.

The public surface: the tuning environment (``rlhpo/HPO-v0``), task suites,
the live-tunable training run, and the observation encoder / action codec that a
policy uses in training and in use alike.
"""

from rlhpo.actions import ActionCodec
from rlhpo.controller import Controller, Decision
from rlhpo.env import ENV_ID, HPOEnv, register_envs
from rlhpo.knobs import KNOBS, SearchSpace
from rlhpo.observation import MetricHistory, ObservationEncoder, normalised_score
from rlhpo.tasks import SpecError, Suite, TaskSpec, load_suite
from rlhpo.trainees import Trainee, build_trainee

__version__ = "0.1.0"

register_envs()

__all__ = [
    "ENV_ID",
    "KNOBS",
    "ActionCodec",
    "Controller",
    "Decision",
    "HPOEnv",
    "MetricHistory",
    "ObservationEncoder",
    "SearchSpace",
    "SpecError",
    "Suite",
    "TaskSpec",
    "Trainee",
    "build_trainee",
    "load_suite",
    "normalised_score",
]
