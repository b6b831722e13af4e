"""The base every comparison method derives from, and the parsed text of a method string."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from rlhpo.baselines.single import RunOutcome
    from rlhpo.compare.methods._cell import Cell
    from rlhpo.tasks.spec import TaskSpec


class MethodError(ValueError):
    """A method string breaks a rule; the message names the string and the bad value."""


@dataclass(frozen=True)
class MethodText:
    """One ``--methods`` entry split into its parts: ``base[:arg][?key=value&...]``.

    ``name`` is the ``?name=`` option (every method takes it); ``params`` holds the others.
    """

    raw: str
    base: str
    arg: str
    has_arg: bool
    params: dict[str, str]
    name: str | None

    def error(self, what: str) -> MethodError:
        """An error that names this method string."""
        return MethodError(f"method {self.raw!r}: {what}")

    def count(self, what: str, default: int, minimum: int) -> int:
        """The ``:N`` argument as an integer >= ``minimum`` (``default`` when absent)."""
        if self.arg == "":
            return default
        if not re.fullmatch(r"\d+", self.arg) or int(self.arg) < minimum:
            raise self.error(f"{what} must be an integer >= {minimum}, got {self.arg!r}")
        return int(self.arg)

    def positive_float(self, key: str) -> float | None:
        """The ``?key=`` option as a positive number, or None when not given."""
        if key not in self.params:
            return None
        value = self.params[key]
        try:
            v = float(value)
        except ValueError:
            v = float("nan")
        if not (math.isfinite(v) and v > 0):
            raise self.error(f"{key} must be a positive number, got {value!r}")
        return v


@dataclass
class CellRun:
    """What a method hands back for one cell, before it becomes rows.

    ``outcome`` is the run whose scores count (a searcher's chosen trial or member, with
    ``samples``/``wall_time`` summed over everything it ran); ``trials`` are the rows of
    ``trials.csv``; ``detail`` goes to the results row's ``detail`` column as JSON.
    """

    outcome: RunOutcome
    trials: list[dict[str, Any]] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    runs: int = 1  # training runs started (trials, members)
    pruned: int = 0
    trial: int = -1  # the trial or member the trace rows belong to; -1 for a single run


@dataclass(frozen=True)
class Method(abc.ABC):
    """A tuning method in a comparison: how it is written, how it runs one cell, and
    what the report and plots need to know about it.

    A subclass is a frozen dataclass (it travels to worker processes) with:

    - ``kind``: its name in ``results.csv``'s ``kind`` column, unique among methods;
    - ``syntax``: how it is written, for the "unknown method" message;
    - :meth:`accepts` and :meth:`parse`: recognise and parse its method strings;
    - :meth:`run`: run one cell (a task, a seed, a start) and hand back a :class:`CellRun`.

    The class attributes below and the overridable methods are what the runner, the
    report and the plots ask a method, so that none of them branches on ``kind``.
    """

    raw: str
    label: str

    kind: ClassVar[str]
    syntax: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset()  # ``?key=`` options besides ``name``
    takes_arg: ClassVar[bool] = False  # accepts ``:ARG``
    start_independent: ClassVar[bool] = False  # picks its own start: runs once per task x seed
    searcher: ClassVar[bool] = False  # runs many trials or members to choose one
    best_of_k: ClassVar[bool] = False  # its trials are sequential: plot the best-of-k curve
    runs_in_driver: ClassVar[bool] = False  # runs in the main process after the worker pool

    # -- parsing ------------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def accepts(cls, base: str) -> bool:
        """Whether ``base`` (the text before ``:`` and ``?``) names this method."""

    @classmethod
    @abc.abstractmethod
    def parse(cls, text: MethodText) -> Method:
        """The method ``text`` describes; raise ``text.error(...)`` on a bad value.
        Options and ``:ARG`` have been checked against :attr:`options` and :attr:`takes_arg`."""

    def resolve(self, suite_name: str, specs: list[TaskSpec]) -> Method:
        """Check the method against the comparison's tasks and fill in what it reads
        from files; raise :class:`MethodError` naming the bad value."""
        return self

    def setup(self) -> dict[str, Any]:
        """What must stay the same for a resumed comparison to reuse this method's cells
        under its label (the method's fields except its spelling)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("raw", "label")
        }

    def fingerprint(self) -> str | None:
        """A digest of files the method reads (a policy's weights), checked on resume."""
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            **{k: v for k, v in self.__dict__.items() if v not in (None, (), "", 0, False)},
        }

    # -- running ------------------------------------------------------------------

    @abc.abstractmethod
    def run(self, cell: Cell) -> CellRun:
        """Run one cell (``cell.spec``, ``cell.seed``, ``cell.start``) at its budget."""

    def cost_runs(self, spec: TaskSpec) -> float:
        """Rough cost of a cell in single runs of ``spec``: long cells are started first."""
        return 1.0

    @classmethod
    @contextlib.contextmanager
    def driver_session(cls, num_cpus: int, address: str | None) -> Iterator[None]:
        """Set up (and tear down) what the :attr:`runs_in_driver` cells of this method
        share in the main process, around all of them."""
        yield

    # -- reporting ----------------------------------------------------------------

    @classmethod
    def intervals_to_target(cls, trials: list[dict[str, Any]], target: float) -> float | None:
        """Training intervals the cell spent until its validation score first reached
        ``target``, from its ``trials.csv`` rows; None: read it from the cell's trace."""
        return None

    @classmethod
    def notes(cls, rows: list[dict[str, Any]]) -> list[str]:
        """Lines for summary.md's Notes, given this kind's typed results rows."""
        return []


def trace_first(val_trace: Any, target: float) -> float:
    """The first interval (1-based) of a ``;``-joined score trace that reaches ``target``."""
    if not isinstance(val_trace, str) or not val_trace:
        return math.inf
    for i, v in enumerate(val_trace.split(";"), start=1):
        if float(v) >= target:
            return float(i)
    return math.inf
