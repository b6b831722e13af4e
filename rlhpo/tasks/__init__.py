"""Task specs, suites, datasets and model builders."""

from rlhpo.tasks.spec import (
    DATASETS,
    METRICS,
    MODELS,
    SpecError,
    StartDistribution,
    Suite,
    TaskSpec,
    load_suite,
    parse_task,
)

__all__ = [
    "DATASETS",
    "METRICS",
    "MODELS",
    "SpecError",
    "StartDistribution",
    "Suite",
    "TaskSpec",
    "load_suite",
    "parse_task",
]
