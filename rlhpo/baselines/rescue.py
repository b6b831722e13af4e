"""A hand-written rescue rule: the prior, plus a lower learning rate for a run that has
not started learning (the baseline a learned policy must beat, issue #22).

The prior (the tuned warm-up + cosine schedule with the do-no-harm guard) misses runs
that never leave chance. This rule watches for them: once the run has spent
``after`` of its budget with its best validation score still at chance (observation
v3's ``at_chance`` feature), it divides the level over the schedule by 4 at each
decision, until it is ``floor`` x where it started or the run leaves chance. It moves
nothing else. It acts on the same observation and through the same action codec as a
policy, so the env, ``rlhpo compare`` (method ``rescue``) and the Controller run it
exactly as they run a policy file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhpo.actions import ActionCodec
from rlhpo.knobs import KNOBS, LR, REGISTRY
from rlhpo.observation import ObservationEncoderV3


@dataclass(frozen=True)
class RescueRule:
    """Lower the lr x1/4 per decision while the run is still at chance after ``after``
    of the budget, down to ``floor`` x the starting level."""

    after: float = 0.2
    floor: float = 1 / 16
    env: dict[str, Any] = field(default_factory=dict)
    """The env settings of the policy it extends (observation v3, base schedule, guard)."""

    def __post_init__(self) -> None:
        if not (0 <= self.after < 1):
            raise ValueError(f"rescue after must be in [0, 1), got {self.after!r}")
        if not (0 < self.floor < 1):
            raise ValueError(f"rescue floor must be in (0, 1), got {self.floor!r}")

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        del deterministic  # a rule has one answer
        o = np.asarray(obs, dtype=np.float64).reshape(-1)
        enc = ObservationEncoderV3
        if o.shape[0] < enc.SIZE:
            raise ValueError(
                f"the rescue rule reads observation v3 ({enc.SIZE} features), got {o.shape[0]}"
            )
        a = np.array(ActionCodec.NOOP, dtype=np.int64)
        level_rel = 4 * o[enc.LR_REL]  # log2(level / starting level)
        if o[enc.AT_CHANCE] >= self.after and level_rel > math.log2(self.floor) + 1e-6:
            lr_moves = REGISTRY[LR.name].moves
            a[KNOBS.index(LR.name)] = int(np.argmin(np.abs(np.asarray(lr_moves) - 0.25)))
        return a

    # The parts of rlhpo.policy.Policy that the env runners read.
    @property
    def freeze(self) -> tuple[str, ...]:
        return ("batch_size", "dropout")

    @property
    def guard(self) -> bool:
        return True

    @property
    def collapse_k(self) -> float | None:
        return self.env.get("collapse_k")

    def env_overrides(self) -> dict[str, Any]:
        return {"obs_version": 3, "base_schedule": self.env.get("base_schedule")}


def rescue_rule(after: float = 0.2, floor: float = 1 / 16) -> RescueRule:
    """The rule over the schedule and guard of the vine recipe (the prior it extends)."""
    from rlhpo.agents import load_settings

    s = load_settings("vine")
    return RescueRule(
        after, floor, env={"collapse_k": s.collapse_k or None, "base_schedule": s.base_schedule}
    )
