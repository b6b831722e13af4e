"""Zero-tuning optimizers as comparison methods: ``schedulefree``, ``prodigy``, ``dadapt``
(the runs themselves are in :mod:`rlhpo.baselines.zero_tuning`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rlhpo.baselines.zero_tuning import ZERO_TUNING, check_zero_tuning
from rlhpo.compare.methods._base import CellRun, Method, MethodText
from rlhpo.compare.methods._cell import Cell


@dataclass(frozen=True)
class ZeroTuningMethod(Method):
    """Schedule-Free AdamW, Prodigy or D-Adaptation Adam with the library's recommended
    settings, the task's default batch size and dropout; no lr knob, no start."""

    optimizer: str = ""

    kind: ClassVar[str] = "zero-tuning"
    syntax: ClassVar[str] = ", ".join(ZERO_TUNING)
    start_independent: ClassVar[bool] = True

    @classmethod
    def accepts(cls, base: str) -> bool:
        return base in ZERO_TUNING

    @classmethod
    def parse(cls, text: MethodText) -> ZeroTuningMethod:
        try:
            check_zero_tuning(text.base)
        except ValueError as e:
            raise text.error(str(e)) from None
        return cls(text.raw, text.name or text.base, optimizer=text.base)

    def run(self, cell: Cell) -> CellRun:
        from rlhpo.baselines.zero_tuning import run_zero_tuning
        from rlhpo.env import run_seed_for

        out = run_zero_tuning(cell.spec, self.optimizer, run_seed_for(cell.seed))
        return CellRun(out, detail={"optimizer": self.optimizer})

    @classmethod
    def notes(cls, rows: list[dict[str, Any]]) -> list[str]:
        if not rows:
            return []
        return [
            "- Zero-tuning optimizers (`schedulefree`, `prodigy`, `dadapt`): library defaults "
            "(Schedule-Free AdamW lr 0.0025 with warm-up over 5% of the steps, Prodigy and "
            "D-Adaptation Adam lr 1.0, no schedule), the task's default batch size and "
            "dropout; their final_lr is the step size they chose."
        ]
