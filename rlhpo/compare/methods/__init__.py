"""The methods a comparison runs, how they are written on the command line, and how
one cell (method x task x seed x start) is executed.

Method strings (``--methods``, comma-separated)::

    policy:DIR                  a saved policy, through HPOEnv (same encoder/codec as training)
    policy:default              a shipped policy by name (rlhpo/policies/NAME)
    policy:DIR?freeze=batch_size,dropout&name=lr-only
                                knob ablation: the frozen knobs keep their start values
    static                      the start's hyperparameters, unchanged
    static-bs16 / static-minbs  static at batch size 16 / at the space's smallest one
    cosine, step                cosine decay / x0.1 at 50% and 75% of the steps, from the start
    warmup-cosine[?peak=LR]     one-cycle style; peak lr tuned on the train split
    plateau                     the hand-written PlateauController, from the start
    optuna-tpe:20               Optuna, sampler tpe|random, optional pruner:
    optuna-random-median:20     ...-median or ...-hyperband; :N trials (default 20)
    pbt:4                       Ray Tune PBT with a population of 4 (default)
    schedulefree, prodigy, dadapt
                                zero-tuning optimizers (Schedule-Free AdamW, Prodigy,
                                D-Adaptation Adam), see rlhpo.baselines.zero_tuning

Every method takes ``?name=LABEL`` to set its display name. Optuna, PBT,
warm-up + cosine and the zero-tuning optimizers do not depend on the start (they
pick their own hyperparameters): they run once per task and seed, with start ``any``.

Adding a method
---------------
A method is a subclass of :class:`Method` (``rlhpo/compare/methods/_base.py``) in a
module of its own under ``rlhpo/compare/methods/``, plus one ``register(...)`` line
below. For example a zero-tuning optimizer run from the start (a sketch; the
real ``ZeroTuningMethod`` is in ``rlhpo/compare/methods/zero_tuning.py``)::

    @dataclass(frozen=True)
    class ScheduleFreeMethod(Method):
        kind: ClassVar[str] = "schedulefree"        # results.csv's kind column
        syntax: ClassVar[str] = "schedulefree"      # listed in "unknown method" errors

        @classmethod
        def accepts(cls, base):                     # base: the text before ':' and '?'
            return base == "schedulefree"

        @classmethod
        def parse(cls, text):                       # text: MethodText (raw, arg, params, name)
            return cls(text.raw, text.name or text.base)

        def run(self, cell):                        # cell.spec, cell.seed, cell.start
            hp = start_hp(cell.spec, cell.start)
            out = run_single(cell.spec, hp, run_seed_for(cell.seed), ...)
            return CellRun(out)

and here ``from rlhpo.compare.methods.zero_tuning import ScheduleFreeMethod`` and
``register(ScheduleFreeMethod)``. ``run`` returns a :class:`CellRun`: the
:class:`~rlhpo.baselines.single.RunOutcome` whose scores count (with its per-interval
``trace``) and, for a searcher, its ``trials.csv`` rows; the rows of ``results.csv`` and
``traces.csv`` are built from it the same way for every method. The dataclass's fields
are the method's settings: ``?key=`` options must be listed in ``options``, and a
``:ARG`` needs ``takes_arg = True``. Class attributes tell the runner, the report and
the plots how to treat it: ``start_independent`` (runs once per task x seed, start
``any``), ``searcher`` (runs several trials or members to pick one), ``best_of_k`` (plot
its best-of-k curve from ``trials.csv``), ``runs_in_driver`` (runs in the main process
after the pool, inside ``driver_session``). Override ``resolve`` to check it against the
tasks, ``cost_runs`` so long cells start first, and ``intervals_to_target`` and
``notes`` for summary.md. Nothing else changes: the runner, report and plots ask the
class, never its kind.
"""

from __future__ import annotations

from rlhpo.compare.methods._base import CellRun, Method, MethodError, MethodText
from rlhpo.compare.methods._cell import (
    ANY_START,
    STARTS,
    Cell,
    CellOutput,
    cell_id,
    execute_cell,
    parse_starts,
    start_hp,
)
from rlhpo.compare.methods.optuna_search import OptunaMethod, study_storage
from rlhpo.compare.methods.pbt_search import PBTMethod
from rlhpo.compare.methods.policy import PolicyMethod, RescueMethod
from rlhpo.compare.methods.single_run import (
    CosineMethod,
    PlateauMethod,
    StaticMethod,
    StepMethod,
    WarmupCosineMethod,
)
from rlhpo.compare.methods.zero_tuning import ZeroTuningMethod
from rlhpo.knobs import KNOBS
from rlhpo.tasks.spec import TaskSpec

# The name the parsed form had before Method existed; kept for callers that import it.
MethodSpec = Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry (parse order = registration order)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"a method must be a subclass of Method, got {cls!r}")
    known = _REGISTRY.get(cls.kind)
    if known is not None and known is not cls:
        raise ValueError(f"method kind {cls.kind!r} is taken by {known.__name__}")
    _REGISTRY[cls.kind] = cls
    return cls


# The registry, one line per method; its order is the parse order and the order of
# summary.md's notes.
register(PolicyMethod)
register(RescueMethod)
register(StaticMethod)
register(CosineMethod)
register(StepMethod)
register(WarmupCosineMethod)
register(PlateauMethod)
register(OptunaMethod)
register(PBTMethod)
register(ZeroTuningMethod)


def registered() -> tuple[type[Method], ...]:
    """The registered method classes, in registration order."""
    return tuple(_REGISTRY.values())


def method_class(kind: str) -> type[Method]:
    """The class of a ``results.csv`` kind; rows of a kind this version does not know
    (written by another version) get the base behaviour."""
    return _REGISTRY.get(kind, Method)


def split_methods(text: str) -> list[str]:
    """Split ``--methods`` on commas, keeping ``?freeze=a,b`` lists together.

    A piece that is a knob name continues the previous method's query string.
    """
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if out and "?" in out[-1] and piece.split("&")[0] in KNOBS:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def parse_methods(text: str) -> list[Method]:
    """Parse a ``--methods`` string; labels must be unique."""
    methods = [parse_method(m) for m in split_methods(text)]
    if not methods:
        raise MethodError(f"--methods must name at least one method, got {text!r}")
    seen: dict[str, str] = {}
    for m in methods:
        if m.label in seen:
            raise MethodError(
                f"methods {seen[m.label]!r} and {m.raw!r} have the same name {m.label!r}; "
                f"give one a ?name=..."
            )
        seen[m.label] = m.raw
    return methods


def parse_method(text: str) -> Method:
    """Parse one method string (see the module docstring for the syntax)."""
    raw = text.strip()
    head, _, query = raw.partition("?")
    base, colon, arg = head.partition(":")
    params = _parse_query(raw, query)
    name = params.pop("name", None)
    cls = next((c for c in registered() if c.accepts(base)), None)
    if cls is None:
        raise MethodError(
            f"unknown method {raw!r}; methods are " + ", ".join(c.syntax for c in registered())
        )
    for k in params:
        if k not in cls.options:
            ok = ", ".join(sorted(cls.options | {"name"}))
            raise MethodError(f"method {raw!r}: unknown option {k!r} (allowed: {ok})")
    if colon and not cls.takes_arg:
        raise MethodError(f"method {raw!r}: {base!r} takes no ':' argument, got {arg!r}")
    return cls.parse(MethodText(raw, base, arg, bool(colon), params, name))


def _parse_query(raw: str, query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in (p for p in query.split("&") if p):
        key, eq, value = part.partition("=")
        if not eq or not key or not value:
            raise MethodError(f"method {raw!r}: query part {part!r} must be key=value")
        params[key] = value
    return params


def resolve(method: Method, suite_name: str, specs: list[TaskSpec]) -> Method:
    """Check a method against the tasks and fill in what it reads from files
    (the tuned warm-up + cosine peak). Raises MethodError naming the bad value."""
    return method.resolve(suite_name, specs)


__all__ = [
    "ANY_START",
    "STARTS",
    "Cell",
    "CellOutput",
    "CellRun",
    "CosineMethod",
    "Method",
    "MethodError",
    "MethodSpec",
    "MethodText",
    "OptunaMethod",
    "PBTMethod",
    "ZeroTuningMethod",
    "PlateauMethod",
    "PolicyMethod",
    "RescueMethod",
    "StaticMethod",
    "StepMethod",
    "WarmupCosineMethod",
    "cell_id",
    "execute_cell",
    "method_class",
    "parse_method",
    "parse_methods",
    "parse_starts",
    "register",
    "registered",
    "resolve",
    "split_methods",
    "start_hp",
    "study_storage",
]
