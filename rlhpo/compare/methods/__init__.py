"""The methods a comparison runs, how they are written on the command line, and how
one cell (method x task x seed x start) is executed.

Method strings (``--methods``, comma-separated)::

    policy:DIR                  a saved policy, through HPOEnv (same encoder/codec as training)
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

Every method takes ``?name=LABEL`` to set its display name. Optuna, PBT and
warm-up + cosine do not depend on the start (they pick their own hyperparameters):
they run once per task and seed, with start ``any``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlhpo.knobs import KNOBS, KnobError, check_knob
from rlhpo.tasks.spec import TaskSpec

# Starting hyperparameters of single-run methods: the task default with these changes.
STARTS: dict[str, dict[str, float]] = {
    "default": {},
    "low-lr": {"lr": 1e-5},
    "high-lr": {"lr": 1e-1},
}
ANY_START = "any"
KINDS = ("policy", "static", "cosine", "step", "warmup-cosine", "plateau", "optuna", "pbt")
_PLAIN = {"static", "cosine", "step", "warmup-cosine", "plateau"}
_QUERY_KEYS = {
    "policy": {"name", "freeze"},
    "warmup-cosine": {"name", "peak"},
}
_OPTUNA = re.compile(r"^optuna-(?P<sampler>[a-z]+)(?:-(?P<pruner>[a-z]+))?$")
_STATIC_BS = re.compile(r"^static-bs(?P<bs>\d+)$")


class MethodError(ValueError):
    """A method string breaks a rule; the message names the string and the bad value."""


@dataclass(frozen=True)
class MethodSpec:
    """One parsed ``--methods`` entry."""

    raw: str
    kind: str
    label: str
    policy_dir: str | None = None
    freeze: tuple[str, ...] = ()
    batch_size: int | None = None  # static at this batch size
    min_batch: bool = False  # static at the space's smallest batch size
    peak: float | None = None
    peak_source: str = ""
    sampler: str | None = None
    pruner: str | None = None
    n: int = 0  # Optuna trials or PBT population

    @property
    def start_independent(self) -> bool:
        return self.kind in ("optuna", "pbt", "warmup-cosine")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, (), "", 0, False)}


def start_hp(spec: TaskSpec, start: str) -> dict[str, Any]:
    """The starting hyperparameters called ``start`` for ``spec``."""
    if start not in STARTS:
        raise MethodError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    return spec.space.clip_all({**spec.default, **STARTS[start]})


def parse_starts(text: str) -> list[str]:
    """Parse ``--starts`` (comma-separated names from :data:`STARTS`)."""
    starts = [s.strip() for s in text.split(",") if s.strip()]
    if not starts:
        raise MethodError(f"--starts must name at least one of {', '.join(STARTS)}, got {text!r}")
    for s in starts:
        if s not in STARTS:
            raise MethodError(f"unknown start {s!r} in --starts; starts are {', '.join(STARTS)}")
    if len(set(starts)) != len(starts):
        raise MethodError(f"--starts names a start twice: {text!r}")
    return starts


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


def parse_methods(text: str) -> list[MethodSpec]:
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


def parse_method(text: str) -> MethodSpec:
    """Parse one method string (see the module docstring for the syntax)."""
    raw = text.strip()
    head, _, query = raw.partition("?")
    base, colon, arg = head.partition(":")
    params = _parse_query(raw, query)
    name = params.pop("name", None)

    def bad(what: str) -> MethodError:
        return MethodError(f"method {raw!r}: {what}")

    if base == "policy":
        _allow(raw, "policy", params)
        if not arg:
            raise bad("policy needs a directory: policy:DIR")
        freeze = tuple(k.strip() for k in re.split(r"[,+]", params.get("freeze", "")) if k.strip())
        for k in freeze:
            try:
                check_knob(k)
            except KnobError as e:
                raise bad(f"freeze: {e}") from None
        label = name or "policy:" + (Path(arg).name or arg)
        if freeze and not name:
            label += "-freeze-" + "+".join(freeze)
        return MethodSpec(raw, "policy", label, policy_dir=arg, freeze=freeze)
    if colon and base not in ("pbt",) and not base.startswith("optuna"):
        raise bad(f"{base!r} takes no ':' argument, got {arg!r}")
    m = _STATIC_BS.match(base)
    if m or base == "static-minbs":
        _allow(raw, "static", params)
        bs = int(m.group("bs")) if m else None
        if bs is not None and bs < 1:
            raise bad(f"batch size must be >= 1, got {bs}")
        return MethodSpec(raw, "static", name or base, batch_size=bs, min_batch=bs is None)
    if base in _PLAIN:
        _allow(raw, base, params)
        peak = None
        if "peak" in params:
            peak = _positive_float(raw, "peak", params["peak"])
        return MethodSpec(raw, base, name or base, peak=peak, peak_source="given" if peak else "")
    m = _OPTUNA.match(base)
    if m:
        _allow(raw, "optuna", params)
        sampler, pruner = m.group("sampler"), m.group("pruner")
        if sampler not in ("tpe", "random"):
            raise bad(f"Optuna sampler must be tpe or random, got {sampler!r}")
        if pruner not in (None, "median", "hyperband"):
            raise bad(f"Optuna pruner must be median or hyperband, got {pruner!r}")
        n = _count(raw, "number of trials", arg, default=20, minimum=1)
        label = name or f"{base}:{n}"
        return MethodSpec(raw, "optuna", label, sampler=sampler, pruner=pruner, n=n)
    if base == "pbt":
        _allow(raw, "pbt", params)
        n = _count(raw, "population", arg, default=4, minimum=2)
        return MethodSpec(raw, "pbt", name or f"pbt:{n}", n=n)
    raise MethodError(
        f"unknown method {raw!r}; methods are policy:DIR, static, static-bsN, static-minbs, "
        f"cosine, step, warmup-cosine, plateau, optuna-tpe|random[-median|-hyperband]:N, pbt:N"
    )


def _parse_query(raw: str, query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for part in (p for p in query.split("&") if p):
        key, eq, value = part.partition("=")
        if not eq or not key or not value:
            raise MethodError(f"method {raw!r}: query part {part!r} must be key=value")
        params[key] = value
    return params


def _allow(raw: str, kind: str, params: dict[str, str]) -> None:
    allowed = _QUERY_KEYS.get(kind, set())
    for k in params:
        if k not in allowed:
            ok = ", ".join(sorted(allowed | {"name"}))
            raise MethodError(f"method {raw!r}: unknown option {k!r} (allowed: {ok})")


def _count(raw: str, what: str, arg: str, default: int, minimum: int) -> int:
    if arg == "":
        return default
    if not re.fullmatch(r"\d+", arg) or int(arg) < minimum:
        raise MethodError(f"method {raw!r}: {what} must be an integer >= {minimum}, got {arg!r}")
    return int(arg)


def _positive_float(raw: str, key: str, value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise MethodError(f"method {raw!r}: {key} must be a positive number, got {value!r}")
    return v


def resolve(method: MethodSpec, suite_name: str, specs: list[TaskSpec]) -> MethodSpec:
    """Check a method against the tasks and fill in what it reads from files
    (the tuned warm-up + cosine peak). Raises MethodError naming the bad value."""
    if method.kind == "static" and method.batch_size is not None:
        for s in specs:
            if method.batch_size not in s.space.batch_sizes:
                raise MethodError(
                    f"method {method.raw!r}: batch size {method.batch_size} is not in task "
                    f"{s.name!r}'s space {list(s.space.batch_sizes)}"
                )
    if method.kind == "warmup-cosine" and method.peak is None:
        from rlhpo.baselines.schedules import tuned_peak

        try:
            peak, source = tuned_peak(suite_name)
        except (FileNotFoundError, ValueError) as e:
            raise MethodError(f"method {method.raw!r}: {e}") from None
        return replace(method, peak=peak, peak_source=source)
    if method.kind == "policy":
        from rlhpo.policy import PolicyFileError, read_manifest

        try:
            read_manifest(method.policy_dir)
        except PolicyFileError as e:
            raise MethodError(f"method {method.raw!r}: {e}") from None
    return method


# ----------------------------------------------------------------------------
# Executing one cell


@dataclass
class Cell:
    """One unit of work: a method on a task from a seed (and a start)."""

    method: MethodSpec
    spec: TaskSpec
    seed: int
    start: str
    out: str
    comparison: str
    suite_name: str = ""
    split: str = ""
    storage: str | None = None
    use_wandb: bool = True
    reference: dict[str, float] | None = None  # the static-default cell's cost, for ratios
    is_reference: bool = False  # this cell is that static-default run
    num_cpus: int = 2
    address: str | None = None

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.method.label, self.spec.name, self.seed, self.start)

    @property
    def cell_id(self) -> str:
        return cell_id(*self.key)


def cell_id(method: str, task: str, seed: int, start: str) -> str:
    """A file-system-safe name for a cell."""
    text = f"{method}__{task}__s{seed}__{start}"
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "-", text)


@dataclass
class CellOutput:
    """What a cell hands back to the runner: one results row, trace rows, trial rows."""

    row: dict[str, Any]
    trace: list[dict[str, Any]] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)


_POLICIES: dict[str, Any] = {}


def _policy(path: str):
    from rlhpo.policy import load_policy

    key = str(Path(path).resolve())
    if key not in _POLICIES:
        _POLICIES[key] = load_policy(path)
    return _POLICIES[key]


def execute_cell(cell: Cell) -> CellOutput:
    """Run one cell (in a worker process or a Ray task) and log it to W&B/JSONL."""
    from rlhpo.runtime import limit_threads

    limit_threads()
    m, spec = cell.method, cell.spec
    detail: dict[str, Any] = {}
    trials: list[dict[str, Any]] = []
    runs, pruned, trial_no = 1, 0, -1
    if m.kind in ("optuna", "pbt"):
        if m.kind == "optuna":
            res = _run_optuna(cell)
        else:
            res = _run_pbt(cell)
        out, trials, detail, runs, pruned, trial_no = res
    else:
        out = _run_single_method(cell, detail)
    ref = cell.reference or {}
    row = {
        "method": m.label,
        "kind": m.kind,
        "start": cell.start,
        "task": spec.name,
        "seed": cell.seed,
        "val_score": out.val_score,
        "test_score": out.test_score,
        "norm_val_score": out.val_norm,
        "norm_test_score": out.test_norm,
        "samples": out.samples,
        "budget_samples": spec.budget_samples,
        "samples_ratio": out.samples / spec.budget_samples,
        "optimizer_steps": out.optimizer_steps,
        "steps_ratio": _ratio(out.optimizer_steps, ref.get("optimizer_steps")),
        "wall_time": out.wall_time,
        "train_time": out.train_time,
        "compute_ratio": _ratio(out.wall_time, ref.get("wall_time")),
        "runs": runs,
        "pruned": pruned,
        "diverged": out.diverged,
        "final_lr": out.hp.get("lr"),
        "final_batch_size": out.hp.get("batch_size"),
        "final_dropout": out.hp.get("dropout"),
        "detail": json.dumps(detail, sort_keys=True),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if cell.is_reference:
        row["steps_ratio"] = row["compute_ratio"] = 1.0
    base = {"method": m.label, "start": cell.start, "task": spec.name, "seed": cell.seed}
    trace = [{**base, "trial": trial_no, **r} for r in out.trace]
    _log(cell, row, trace, trials)
    return CellOutput(row=row, trace=trace, trials=trials)


def _ratio(a: float, b: float | None) -> float:
    return a / b if b else float("nan")


def _run_single_method(cell: Cell, detail: dict[str, Any]):
    from rlhpo.baselines import PlateauController, run_single, schedule_for
    from rlhpo.env import run_seed_for

    m, spec = cell.method, cell.spec
    seed = run_seed_for(cell.seed)
    if m.kind == "policy":
        return run_policy(cell)
    if m.kind == "warmup-cosine":
        hp = {**spec.default, "lr": m.peak}
        detail["peak_lr"] = m.peak
        detail["peak_source"] = m.peak_source
        return run_single(spec, hp, seed, scheduler=schedule_for(m.kind, spec, hp["batch_size"]))
    hp = start_hp(spec, cell.start)
    if m.kind == "static":
        if m.min_batch:
            hp["batch_size"] = spec.space.batch_sizes[0]
        elif m.batch_size is not None:
            hp["batch_size"] = m.batch_size
        return run_single(spec, hp, seed)
    if m.kind in ("cosine", "step"):
        return run_single(spec, hp, seed, scheduler=schedule_for(m.kind, spec, hp["batch_size"]))
    if m.kind == "plateau":
        ctl = PlateauController(spec.space)
        out = run_single(spec, hp, seed, controller=ctl)
        detail["events"] = [f"{i}:{e}" for i, e in ctl.events]
        return out
    raise MethodError(f"method {m.raw!r}: kind {m.kind!r} is not a single-run method")


def run_policy(cell: Cell):
    """A policy run through HPOEnv, deterministic actions, same seed as the baselines."""
    from rlhpo.baselines.single import RunOutcome, preload
    from rlhpo.env import HPOEnv
    from rlhpo.observation import normalised_score
    from rlhpo.tasks.spec import Suite

    m, spec = cell.method, cell.spec
    policy = _policy(m.policy_dir)
    suite = Suite(name=cell.suite_name, tasks={spec.name: spec}, train=(spec.name,), test=())
    freeze = tuple(sorted(set(m.freeze) | set(policy.freeze)))
    env = HPOEnv(suite, split="train", freeze=freeze, timing=True)
    preload(spec)
    hp = start_hp(spec, cell.start)
    t0 = time.perf_counter()
    obs, info = env.reset(seed=cell.seed, options={"task": spec.name, "hp": hp})
    trace = [_env_row(info, t0)]
    done = False
    while not done:
        obs, _, term, trunc, info = env.step(policy.act(obs))
        trace.append(_env_row(info, t0))
        done = term or trunc
    wall = time.perf_counter() - t0
    train_time = env.trainee.wall_time
    test = env.test_score()["score"]
    n_classes = env.trainee.data.n_classes
    diverged = bool(info["diverged"])
    return RunOutcome(
        val_score=info["val_score"],
        val_norm=info["val_norm_score"],
        test_score=test,
        test_norm=0.0 if diverged else normalised_score(spec.metric, test, n_classes),
        samples=info["samples"],
        optimizer_steps=info["optimizer_steps"],
        wall_time=wall,
        train_time=train_time,
        diverged=diverged,
        hp=info["hp"],
        intervals=info["interval"],
        trace=trace,
    )


def _env_row(info: dict[str, Any], t0: float) -> dict[str, Any]:
    return {
        "interval": info["interval"],
        "samples": info["samples"],
        "optimizer_steps": info["optimizer_steps"],
        "wall_time": time.perf_counter() - t0,
        "val_score": info["val_score"],
        "norm_val_score": info["val_norm_score"],
        "val_loss": info["val_loss"],
        "train_loss": info["train_loss"],
        "lr": info["hp"]["lr"],
        "batch_size": info["hp"]["batch_size"],
        "dropout": info["hp"]["dropout"],
        "diverged": info["diverged"],
    }


def study_storage(cell: Cell) -> tuple[str, str]:
    """Storage URL and study name of an Optuna cell: by default one SQLite file per
    study under ``OUT/studies`` (no lock contention between worker processes)."""
    name = f"rlhpo-{cell.comparison}-{cell.cell_id}"
    if cell.storage:
        return cell.storage, name
    folder = Path(cell.out) / "studies"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / (cell.cell_id + '.db')).resolve()}", name


def _run_optuna(cell: Cell):
    from rlhpo.baselines.optuna_study import run_study
    from rlhpo.baselines.single import RunOutcome

    m, spec = cell.method, cell.spec
    url, name = study_storage(cell)
    st = run_study(
        spec,
        cell.seed,
        m.n,
        storage=url,
        study_name=name,
        sampler=m.sampler,
        pruner=m.pruner,
    )
    b = st.best
    if b is None:
        raise RuntimeError(f"study {name!r} finished without a complete trial")
    out = RunOutcome(
        val_score=b.val_score,
        val_norm=b.val_norm,
        test_score=b.test_score,
        test_norm=b.test_norm,
        samples=st.samples,
        optimizer_steps=st.optimizer_steps,
        wall_time=st.wall_time,
        train_time=st.train_time,
        diverged=b.diverged,
        hp=b.hp,
        intervals=b.intervals,
        trace=b.trace,
    )
    base = {"method": m.label, "task": spec.name, "seed": cell.seed}
    trials = [
        {
            **base,
            "trial": t.number,
            "state": t.state,
            **{k: t.hp.get(k) for k in KNOBS},
            "val_score": t.val_score,
            "norm_val_score": t.val_norm,
            "test_score": t.test_score,
            "norm_test_score": t.test_norm,
            "samples": t.samples,
            "optimizer_steps": t.optimizer_steps,
            "wall_time": t.wall_time,
            "intervals": t.intervals,
            "diverged": t.diverged,
            "val_trace": ";".join(f"{v:.4f}" for v in t.val_trace),
        }
        for t in st.trials
    ]
    detail = {
        "study": name,
        "storage": url if cell.storage is None else "(--storage)",
        "chosen_trial": b.number,
        "trials_found_at_start": st.found,
        "chosen_hp": b.hp,
    }
    return out, trials, detail, len(st.trials), st.n_pruned, b.number


def _run_pbt(cell: Cell):
    from rlhpo.baselines.pbt import run_pbt
    from rlhpo.baselines.single import RunOutcome

    m, spec = cell.method, cell.spec
    res = run_pbt(
        spec,
        cell.seed,
        population=m.n,
        num_cpus=cell.num_cpus,
        address=cell.address,
        storage_dir=None,
    )
    b = res.best
    out = RunOutcome(
        val_score=b.val_score,
        val_norm=b.val_norm,
        test_score=b.test_score,
        test_norm=b.test_norm,
        samples=res.samples,
        optimizer_steps=res.optimizer_steps,
        wall_time=res.wall_time,
        train_time=res.train_time,
        diverged=b.diverged,
        hp=b.hp,
        intervals=len(b.trace),
        trace=b.trace,
    )
    base = {"method": m.label, "task": spec.name, "seed": cell.seed}
    trials = [
        {
            **base,
            "trial": r.member,
            "state": "MEMBER",
            **{k: r.hp.get(k) for k in KNOBS},
            "val_score": r.val_score,
            "norm_val_score": r.val_norm,
            "test_score": r.test_score,
            "norm_test_score": r.test_norm,
            "samples": min(len(r.trace) * spec.interval_samples, spec.budget_samples),
            "optimizer_steps": None,
            "wall_time": None,
            "intervals": len(r.trace),
            "diverged": r.diverged,
            "val_trace": ";".join(f"{t['norm_val_score']:.4f}" for t in r.trace),
        }
        for r in res.members
    ]
    detail = {
        "population": m.n,
        "chosen_member": b.member,
        "budget": "population x one run's samples",
        "ray_overhead_s": round(res.wall_time - res.train_time, 2),
    }
    return out, trials, detail, m.n, 0, b.member


def _log(cell: Cell, row: dict[str, Any], trace: list[dict], trials: list[dict]) -> None:
    """One W&B run (offline by default) + JSONL per cell, written after the run so
    that W&B's start-up time never counts in a method's wall time."""
    from rlhpo.tracking import Tracker

    config = {
        "comparison": cell.comparison,
        "method": cell.method.label,
        "method_spec": cell.method.raw,
        "kind": cell.method.kind,
        "task": cell.spec.name,
        "seed": cell.seed,
        "start": cell.start,
        "suite": cell.suite_name,
        "split": cell.split,
        "budget_samples": cell.spec.budget_samples,
        "intervals": cell.spec.intervals,
    }
    with Tracker(
        Path(cell.out) / "runs" / cell.cell_id,
        config=config,
        use_wandb=cell.use_wandb,
        group=cell.comparison,
        name=cell.cell_id,
        job_type=cell.method.label,
    ) as tr:
        for r in trace:
            tr.log(
                {
                    "val/score": r["val_score"],
                    "val/norm_score": r["norm_val_score"],
                    "val/loss": r.get("val_loss"),
                    "train/loss": r.get("train_loss"),
                    "hp/lr": r["lr"],
                    "hp/batch_size": r["batch_size"],
                    "hp/dropout": r["dropout"],
                    "cost/samples": r["samples"],
                },
                step=int(r["interval"]),
            )
        for t in trials:
            tr.log({f"trial/{k}": v for k, v in t.items() if k not in ("method", "task", "seed")})
        tr.summary({k: v for k, v in row.items() if k != "detail"})
