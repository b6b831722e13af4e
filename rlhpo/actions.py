"""How a policy's action becomes new hyperparameters: one versioned codec shared by
the environment and the controller.

The action has one discrete dimension per knob of the space, in registry order
(:data:`rlhpo.knobs.REGISTRY`); each knob declares its moves. For the three
required knobs the action is ``MultiDiscrete([5, 3, 3])``: relative moves, so a
policy learned on one task's scale transfers to another's.

- learning rate: multiply by 1/4, 1/2, 1, 2 or 4;
- batch size: one step down, stay, or one step up the space's list of sizes;
- dropout: -0.1, 0 or +0.1 (absolute).

Opt-in knobs (weight decay, momentum) add one dimension each when the space
names them. The result is clipped to the search space. Knobs can be frozen
(kept as they are whatever the action says), which is how the knob ablation is run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from rlhpo.knobs import KNOBS, REGISTRY, SearchSpace, check_knob, order_knobs


def nvec_of(knobs: Iterable[str]) -> tuple[int, ...]:
    """Choices per action dimension for these knobs."""
    return tuple(len(REGISTRY[k].moves) for k in order_knobs(knobs))


def noop_of(knobs: Iterable[str]) -> tuple[int, ...]:
    """The action that keeps these knobs as they are."""
    return tuple(REGISTRY[k].noop for k in order_knobs(knobs))


class ActionCodec:
    """Decodes actions into knob values within a :class:`SearchSpace`.

    ``knobs`` are the action's dimensions (default: every knob of the space); a
    policy file names the knobs it was trained with.
    """

    VERSION = 1
    #: The codec of the required knobs (every shipped policy).
    NVEC = nvec_of(KNOBS)
    NOOP = noop_of(KNOBS)

    def __init__(
        self,
        space: SearchSpace,
        freeze: Iterable[str] = (),
        knobs: Iterable[str] | None = None,
    ):
        self.space = space
        self.knobs = order_knobs(space.names if knobs is None else knobs)
        missing = [k for k in self.knobs if k not in space.names]
        if missing:
            raise ValueError(
                f"the action moves knobs {', '.join(missing)} that the space "
                f"({', '.join(space.names)}) does not have"
            )
        self.freeze = frozenset(freeze)
        for k in self.freeze:
            check_knob(k)
        self.nvec = nvec_of(self.knobs)
        self.noop = noop_of(self.knobs)

    def decode(self, action: Any, hp: dict[str, Any]) -> dict[str, Any]:
        """New hyperparameters after applying ``action`` to ``hp``."""
        a = np.asarray(action).reshape(-1)
        if a.shape != (len(self.knobs),):
            raise ValueError(
                f"action must have {len(self.knobs)} entries ({', '.join(self.knobs)}), "
                f"got shape {a.shape}"
            )
        for i, (v, n) in enumerate(zip(a, self.nvec, strict=True)):
            if not (0 <= int(v) < n) or int(v) != v:
                got = v.item() if hasattr(v, "item") else v
                raise ValueError(f"action[{i}] must be an integer in [0, {n - 1}], got {got!r}")
        new = dict(hp)
        for k, choice in zip(self.knobs, a, strict=True):
            if k not in self.freeze:
                new[k] = self.space.step(k, hp[k], int(choice))
        return {k: new[k] for k in self.knobs}
