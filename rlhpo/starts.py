"""Named starting hyperparameters: one registry for ``rlhpo compare --starts``,
``rlhpo apply --start`` and ``HPOEnv.reset(options={"start": ...})``.

- ``default``: the task's default hyperparameters;
- ``low-lr``: the default with the learning rate at the lowest value of the
  task's *search space* (the policy's and the baselines' floor);
- ``high-lr``: the default with the learning rate at the highest value of the space;
- ``random`` (:data:`START_DRAWN`): drawn from the task's start distribution by
  the environment's generator (not a fixed point, so only the env and ``rlhpo
  apply`` take it).

``low-lr`` once meant the start distribution's lowest lr in ``rlhpo apply`` and
1e-5 clipped into the space in ``rlhpo compare``; every shipped suite has both at
1e-5, so the one meaning kept here reproduces both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlhpo.knobs import LR
from rlhpo.tasks.spec import TaskSpec

#: The start drawn from the task's start distribution (by the env's generator).
START_DRAWN = "random"

NAMED_STARTS: dict[str, Callable[[TaskSpec], dict[str, Any]]] = {
    "default": lambda spec: dict(spec.default),
    "low-lr": lambda spec: {**spec.default, LR.name: LR.lowest(spec.space.bounds(LR.name))},
    "high-lr": lambda spec: {**spec.default, LR.name: LR.highest(spec.space.bounds(LR.name))},
}


def start_hp(spec: TaskSpec, name: str) -> dict[str, Any]:
    """The starting hyperparameters called ``name`` for ``spec`` (within its space)."""
    make = NAMED_STARTS.get(name)
    if make is None:
        raise ValueError(f"start must be one of {', '.join(NAMED_STARTS)}, got {name!r}")
    return spec.space.clip_all(make(spec))
