"""Callbacks that let a saved policy tune runs of other training frameworks.

- :mod:`rlhpo.integrations.hf`: ``RLHPOCallback`` for ``transformers.Trainer``;
- :mod:`rlhpo.integrations.lightning`: ``RLHPOCallback`` for Lightning 2.x
  (extra: ``pip install 'rlhpo[lightning]'``).

Nothing here imports a framework: each submodule imports its own when it is
imported, and says what to install when it is missing.

Both frameworks fix the data loader once training starts, so the batch size
knob works through gradient accumulation: effective batch = micro-batch x
accumulation steps (x processes).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["GradientAccumulation", "require"]


def require(module: str, install: str, what: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that gives the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the {module!r} package: {install}") from e


class GradientAccumulation:
    """The batch size knob as a number of accumulated micro-batches.

    A requested batch size becomes ``round(batch / micro)`` accumulation steps
    (at least 1); the batch size actually in force is returned, so the policy
    observes what it got. A change waits until the count of micro-batches in the
    current epoch is a multiple of the new step count, so that no optimizer step
    mixes micro-batches of two settings (the frameworks decide when to step from
    that count).
    """

    def __init__(self, micro_batch: int, steps: int = 1):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch!r}")
        self.micro_batch = int(micro_batch)
        self.steps = int(steps)
        self.pending: int | None = None
        self.in_epoch = 0

    def request(self, batch_size: int) -> int:
        """Ask for ``batch_size``; returns the effective batch size that will apply."""
        steps = max(1, round(batch_size / self.micro_batch))
        self.pending = steps if steps != self.steps else None
        return steps * self.micro_batch

    def epoch_start(self) -> int | None:
        """New steps to set at an epoch's start (always aligned), or None."""
        self.in_epoch = 0
        return self._take()

    def micro_batch_done(self) -> int | None:
        """Count one micro-batch; new steps to set now, or None."""
        self.in_epoch += 1
        return self._take()

    def ready(self) -> int | None:
        """New steps to set now if aligned (e.g. right after a decision), or None."""
        return self._take()

    def _take(self) -> int | None:
        if self.pending is None or self.in_epoch % self.pending:
            return None
        self.steps, self.pending = self.pending, None
        return self.steps

    @property
    def batch_size(self) -> int:
        """The effective batch size requested (in force once aligned)."""
        return (self.pending or self.steps) * self.micro_batch
