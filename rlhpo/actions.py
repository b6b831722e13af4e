"""How a policy's action becomes new hyperparameters: one versioned codec shared by
the environment and the controller.

The action is ``MultiDiscrete([5, 3, 3])``: relative moves, so a policy learned on
one task's scale transfers to another's.

- learning rate: multiply by 1/4, 1/2, 1, 2 or 4;
- batch size: one step down, stay, or one step up the space's list of sizes;
- dropout: -0.1, 0 or +0.1 (absolute).

The result is clipped to the search space. Knobs can be frozen (kept as they
are whatever the action says), which is how the knob ablation is run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from rlhpo.knobs import KNOBS, SearchSpace, check_knob

LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
BATCH_STEPS = (-1, 0, 1)
DROPOUT_STEPS = (-0.1, 0.0, 0.1)


class ActionCodec:
    """Decodes actions into knob values within a :class:`SearchSpace`."""

    VERSION = 1
    NVEC = (len(LR_FACTORS), len(BATCH_STEPS), len(DROPOUT_STEPS))
    NOOP = (2, 1, 1)

    def __init__(self, space: SearchSpace, freeze: Iterable[str] = ()):
        self.space = space
        self.freeze = frozenset(freeze)
        for k in self.freeze:
            check_knob(k)

    def decode(self, action: Any, hp: dict[str, Any]) -> dict[str, Any]:
        """New hyperparameters after applying ``action`` to ``hp``."""
        a = np.asarray(action).reshape(-1)
        if a.shape != (3,):
            raise ValueError(
                f"action must have 3 entries (lr, batch_size, dropout), got shape {a.shape}"
            )
        for i, (v, n) in enumerate(zip(a, self.NVEC, strict=True)):
            if not (0 <= int(v) < n) or int(v) != v:
                got = v.item() if hasattr(v, "item") else v
                raise ValueError(f"action[{i}] must be an integer in [0, {n - 1}], got {got!r}")
        sp = self.space
        new = dict(hp)
        new["lr"] = sp.clip("lr", hp["lr"] * LR_FACTORS[int(a[0])])
        sizes = sp.batch_sizes
        i = sizes.index(sp.clip("batch_size", hp["batch_size"]))
        new["batch_size"] = sizes[min(max(i + BATCH_STEPS[int(a[1])], 0), len(sizes) - 1)]
        new["dropout"] = sp.clip("dropout", hp["dropout"] + DROPOUT_STEPS[int(a[2])])
        for k in self.freeze:
            new[k] = hp[k]
        return {k: new[k] for k in KNOBS}
