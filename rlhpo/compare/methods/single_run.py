"""Methods that train one run: static hyperparameters, lr schedules and the plateau
controller."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from rlhpo.compare.methods._base import CellRun, Method, MethodError, MethodText
from rlhpo.compare.methods._cell import Cell, start_hp
from rlhpo.tasks.spec import TaskSpec

_STATIC_BS = re.compile(r"^static-bs(?P<bs>\d+)$")


def _seed(cell: Cell) -> int:
    from rlhpo.env import run_seed_for

    return run_seed_for(cell.seed)


@dataclass(frozen=True)
class StaticMethod(Method):
    """The start's hyperparameters, unchanged (``static``); ``static-bsN`` at batch size N,
    ``static-minbs`` at the space's smallest batch size."""

    batch_size: int | None = None
    min_batch: bool = False

    kind: ClassVar[str] = "static"
    syntax: ClassVar[str] = "static, static-bsN, static-minbs"

    @classmethod
    def accepts(cls, base: str) -> bool:
        return base in ("static", "static-minbs") or _STATIC_BS.match(base) is not None

    @classmethod
    def parse(cls, text: MethodText) -> StaticMethod:
        m = _STATIC_BS.match(text.base)
        bs = int(m.group("bs")) if m else None
        if bs is not None and bs < 1:
            raise text.error(f"batch size must be >= 1, got {bs}")
        min_batch = text.base == "static-minbs"
        return cls(text.raw, text.name or text.base, batch_size=bs, min_batch=min_batch)

    def resolve(self, suite_name: str, specs: list[TaskSpec]) -> StaticMethod:
        if self.batch_size is not None:
            for s in specs:
                if self.batch_size not in s.space.batch_sizes:
                    raise MethodError(
                        f"method {self.raw!r}: batch size {self.batch_size} is not in task "
                        f"{s.name!r}'s space {list(s.space.batch_sizes)}"
                    )
        return self

    def cost_runs(self, spec: TaskSpec) -> float:
        if self.batch_size is not None:
            return max(1.0, spec.default["batch_size"] / self.batch_size)
        return 3.0 if self.min_batch else 1.0

    def run(self, cell: Cell) -> CellRun:
        from rlhpo.baselines import run_single

        hp = start_hp(cell.spec, cell.start)
        if self.min_batch:
            hp["batch_size"] = cell.spec.space.batch_sizes[0]
        elif self.batch_size is not None:
            hp["batch_size"] = self.batch_size
        return CellRun(run_single(cell.spec, hp, _seed(cell)))


@dataclass(frozen=True)
class _ScheduleMethod(Method):
    """An lr schedule from the start's hyperparameters (the schedule named ``kind``)."""

    @classmethod
    def accepts(cls, base: str) -> bool:
        return base == cls.kind

    @classmethod
    def parse(cls, text: MethodText) -> Method:
        return cls(text.raw, text.name or text.base)

    def run(self, cell: Cell) -> CellRun:
        from rlhpo.baselines import run_single, schedule_for

        hp = start_hp(cell.spec, cell.start)
        scheduler = schedule_for(self.kind, cell.spec, hp["batch_size"])
        return CellRun(run_single(cell.spec, hp, _seed(cell), scheduler=scheduler))


@dataclass(frozen=True)
class CosineMethod(_ScheduleMethod):
    """Cosine decay of the start's lr to 0."""

    kind: ClassVar[str] = "cosine"
    syntax: ClassVar[str] = "cosine"


@dataclass(frozen=True)
class StepMethod(_ScheduleMethod):
    """The start's lr x0.1 at 50% and 75% of the steps."""

    kind: ClassVar[str] = "step"
    syntax: ClassVar[str] = "step"


@dataclass(frozen=True)
class WarmupCosineMethod(Method):
    """One-cycle style: warm-up to a peak lr tuned on the train split, then cosine to 0.
    It picks its own lr, so it runs once per task and seed (start ``any``)."""

    peak: float | None = None
    peak_source: str = ""
    #: Tuned peaks per optimizer kind (``rlhpo.baselines.schedules.optimizer_kind``);
    #: empty when ``peak`` was given or the tuning file holds one peak only.
    peaks: tuple[tuple[str, float], ...] = ()

    kind: ClassVar[str] = "warmup-cosine"
    syntax: ClassVar[str] = "warmup-cosine[?peak=LR]"
    options: ClassVar[frozenset[str]] = frozenset({"peak"})
    start_independent: ClassVar[bool] = True

    @classmethod
    def accepts(cls, base: str) -> bool:
        return base == cls.kind

    @classmethod
    def parse(cls, text: MethodText) -> WarmupCosineMethod:
        peak = text.positive_float("peak")
        return cls(text.raw, text.name or text.base, peak=peak, peak_source="given" if peak else "")

    def resolve(self, suite_name: str, specs: list[TaskSpec]) -> WarmupCosineMethod:
        if self.peak is not None:
            return self
        from rlhpo.baselines.schedules import tuned_peak

        try:
            peak, source = tuned_peak(suite_name)
            peaks = {k: tuned_peak(suite_name, k) for k in ("adam", "sgd")}
        except (FileNotFoundError, ValueError) as e:
            raise MethodError(f"method {self.raw!r}: {e}") from None
        if len({p for p, _ in peaks.values()}) > 1:
            return replace(
                self,
                peak=peak,
                peak_source=peaks["adam"][1].replace(" for adam", " per optimizer kind"),
                peaks=tuple((k, p) for k, (p, _) in peaks.items()),
            )
        return replace(self, peak=peak, peak_source=source)

    def peak_for(self, spec: TaskSpec) -> float:
        """The peak lr of a run of ``spec`` (its optimizer kind's, where tuned per kind)."""
        from rlhpo.baselines.schedules import optimizer_kind

        return dict(self.peaks).get(optimizer_kind(spec.optimizer), self.peak)

    def run(self, cell: Cell) -> CellRun:
        from rlhpo.baselines import run_single, schedule_for

        spec = cell.spec
        peak = self.peak_for(spec)
        hp = {**spec.default, "lr": peak}
        scheduler = schedule_for(self.kind, spec, hp["batch_size"])
        out = run_single(spec, hp, _seed(cell), scheduler=scheduler)
        return CellRun(out, detail={"peak_lr": peak, "peak_source": self.peak_source})

    @classmethod
    def notes(cls, rows: list[dict[str, Any]]) -> list[str]:
        notes, seen = [], set()
        for r in rows:
            if r["method"] not in seen:
                d = json.loads(r["detail"] or "{}")
                seen.add(r["method"])
                peaks = sorted(
                    {
                        json.loads(x["detail"] or "{}").get("peak_lr")
                        for x in rows
                        if x["method"] == r["method"]
                    }
                )
                notes.append(
                    f"- `{r['method']}`: peak lr {', '.join(str(p) for p in peaks)} ({d.get('peak_source')}), "
                    "warm-up over the first 10% of the steps from peak/25, then cosine to 0."
                )
        return notes


@dataclass(frozen=True)
class PlateauMethod(Method):
    """The hand-written :class:`~rlhpo.baselines.PlateauController`, from the start."""

    kind: ClassVar[str] = "plateau"
    syntax: ClassVar[str] = "plateau"

    @classmethod
    def accepts(cls, base: str) -> bool:
        return base == cls.kind

    @classmethod
    def parse(cls, text: MethodText) -> PlateauMethod:
        return cls(text.raw, text.name or text.base)

    def run(self, cell: Cell) -> CellRun:
        from rlhpo.baselines import PlateauController, run_single

        ctl = PlateauController(cell.spec.space)
        out = run_single(cell.spec, start_hp(cell.spec, cell.start), _seed(cell), controller=ctl)
        return CellRun(out, detail={"events": [f"{i}:{e}" for i, e in ctl.events]})
