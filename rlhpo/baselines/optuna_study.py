"""Optuna baselines: TPE or random search, with or without pruning, over exactly the
search space that bounds the policy's actions (``SearchSpace.suggest``).

Every trial is a :func:`~rlhpo.baselines.single.run_single` run with the env's
interval structure; the normalised validation score is reported after each
interval so that pruners can stop a trial. The study's pick is the complete trial
with the best *validation* score of its final model; its test score is what a
comparison counts. Every trial's cost (samples, optimizer steps, wall time) is
written into the study when it completes or is pruned, so pruned trials are
charged for what they consumed (a trial cut short by killing the process is not:
its cost was never recorded).

Studies live in any Optuna RDB storage (a SQLite file by default) and are created
with ``load_if_exists=True``: running the same study again continues it up to
``n_trials`` finished trials, and gives what an uninterrupted study gives. Three
things make that so: a trial's training seed comes from the cell's seed and the
trial's hyperparameters (not its number), the sampler is reseeded from the cell's
seed and the count of finished trials before each trial (a new process would
otherwise restart its random stream), and a trial left RUNNING by a killed process
is run again in place, with the hyperparameters it already drew and its number.
A shared storage is checked and given its schema once by :func:`prepare_storage`
before workers open it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhpo.baselines.single import run_single
from rlhpo.tasks.spec import TaskSpec

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband")


@dataclass
class TrialRecord:
    """One trial as stored in the study. ``state``: COMPLETE, PRUNED or FAIL."""

    number: int
    state: str
    hp: dict[str, Any]
    val_score: float | None
    val_norm: float | None
    test_score: float | None
    test_norm: float | None
    samples: int
    optimizer_steps: int
    wall_time: float
    train_time: float
    intervals: int
    diverged: bool
    val_trace: list[float] = field(default_factory=list)
    trace: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StudyOutcome:
    """All trials in order, the pick (best validation score) and the summed cost."""

    trials: list[TrialRecord]
    best: TrialRecord | None
    samples: int
    optimizer_steps: int
    wall_time: float
    train_time: float
    found: int  # finished trials already in the storage when this call started

    @property
    def n_complete(self) -> int:
        return sum(t.state == "COMPLETE" for t in self.trials)

    @property
    def n_pruned(self) -> int:
        return sum(t.state == "PRUNED" for t in self.trials)


def trial_seed(seed: int, number: int) -> int:
    """The trainee seed of trial ``number`` in the study of cell seed ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(number)]).generate_state(1)[0] & 0x7FFFFFFF)


def params_seed(seed: int, hp: dict[str, Any]) -> int:
    """The trainee seed of a trial with hyperparameters ``hp`` in the study of cell seed
    ``seed``: the same hyperparameters always train the same way, so a trial asked again
    after a resume scores what it scored before."""
    import hashlib
    import json

    text = json.dumps({k: hp[k] for k in sorted(hp)}, sort_keys=True, default=repr)
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    words = [int(seed), digest & 0xFFFFFFFF, digest >> 32]
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


def make_sampler(kind: str, seed: int, n_trials: int):
    """A seeded sampler. TPE's random start-up phase is half the trials (at most
    Optuna's default of 10), so that small studies still get some TPE steps."""
    import optuna

    if kind == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=min(10, max(2, n_trials // 2))
        )
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {kind!r}")


def make_pruner(kind: str | None, intervals: int):
    """No pruning, a MedianPruner (not before a quarter of the run: early scores say
    little about a learning rate), or a HyperbandPruner over the run's intervals."""
    import optuna

    if kind is None:
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=5, n_warmup_steps=max(1, intervals // 4)
        )
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=intervals, reduction_factor=3
        )
    raise ValueError(f"pruner must be one of {', '.join(PRUNERS)} or none, got {kind!r}")


def open_storage(url: str):
    """An Optuna RDB storage. SQLite gets a generous lock timeout and write-ahead
    logging: with the default journal every write is synced, about 20 ms here,
    which would add ~1 s of overhead to a 20-interval trial."""
    import optuna

    if not url.startswith("sqlite"):
        return optuna.storages.RDBStorage(url)
    import sqlalchemy

    store = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})

    def on_connect(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    sqlalchemy.event.listen(store.engine, "connect", on_connect)
    store.engine.dispose()  # reconnect with the pragmas
    return store


class StorageError(ValueError):
    """An Optuna storage URL that cannot be used: bad URL, missing driver, no server."""


# The driver each SQLAlchemy dialect loads by default, and how to install it.
_DRIVER_HINTS = {
    "postgresql": "pip install 'rlhpo[postgres]' (psycopg 3, SQLAlchemy's default driver)",
    "mysql": "pip install pymysql  and use mysql+pymysql://...",
}


def prepare_storage(url: str, timeout_s: float = 5.0) -> str:
    """Check an Optuna RDB URL up front and create Optuna's schema in it once.

    Checks, each with a one-line :class:`StorageError`: the URL parses, its database
    driver imports (with the install command when not), the server answers within
    ``timeout_s`` seconds. Then opens it as an Optuna storage, which creates the
    tables (and on PostgreSQL the ``studydirection`` enum type). Doing that here,
    before any worker starts, matters: workers that all find a fresh database empty
    race on ``CREATE TYPE`` and all but one fail. Returns the URL with its password
    hidden, for messages.
    """
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy raises several kinds
        raise StorageError(
            f"--storage must be an SQLAlchemy database URL such as "
            f"postgresql://user:pw@host/db or sqlite:///path.db, got {url!r} ({e})"
        ) from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect()
    except Exception as e:  # noqa: BLE001 - unknown dialect name
        raise StorageError(f"--storage {shown}: unknown database kind ({e})") from None
    try:
        dialect.import_dbapi()
    except ImportError as e:
        family = parsed.get_backend_name()
        hint = _DRIVER_HINTS.get(family, f"install the {parsed.drivername} driver")
        raise StorageError(
            f"--storage {shown}: its database driver does not import ({e}); {hint}"
        ) from None
    connect_args: dict[str, Any] = {}
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "mysql"):
        connect_args["connect_timeout"] = max(1, math.ceil(timeout_s))
    elif backend == "sqlite":
        connect_args["timeout"] = 60
    engine = sqlalchemy.create_engine(parsed, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 - driver errors have no common base
        first = str(getattr(e, "orig", e)).strip().splitlines()
        raise StorageError(
            f"--storage {shown}: cannot connect within {timeout_s:g} s: "
            f"{first[0] if first else type(e).__name__}"
        ) from None
    finally:
        engine.dispose()
    try:
        store = open_storage(url)
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"--storage {shown}: cannot create Optuna's tables: {e}") from None
    store.engine.dispose()
    return shown


def run_study(
    spec: TaskSpec,
    seed: int,
    n_trials: int,
    *,
    storage: str,
    study_name: str,
    sampler: str = "tpe",
    pruner: str | None = None,
) -> StudyOutcome:
    """Run (or continue) a study on ``spec`` until it holds ``n_trials`` finished trials.

    A trial with hyperparameters ``hp`` trains with seed :func:`params_seed` ``(seed,
    hp)``; before the trial that follows ``k`` finished ones the sampler is seeded with
    :func:`trial_seed` ``(seed, k)``. A trial left RUNNING by a killed run (this study
    belongs to one comparison cell, and its folder is locked) is run again in place.
    """
    import optuna
    from optuna.trial import TrialState

    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = open_storage(storage)
    study = optuna.create_study(
        study_name=study_name,
        storage=store,
        sampler=make_sampler(sampler, seed, n_trials),
        pruner=make_pruner(pruner, spec.intervals),
        direction="maximize",
        load_if_exists=True,
    )
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    found = len(study.get_trials(deepcopy=False, states=finished))

    def objective(trial: optuna.Trial) -> float:
        t0 = time.perf_counter()
        hp = spec.space.suggest(trial)
        # The sampler's work (inside suggest) is part of the search's cost.
        suggest_time = time.perf_counter() - t0
        val_trace: list[float] = []

        def on_interval(i: int, rec, tr) -> None:
            val_trace.append(round(rec.val_score, 6))
            if pruner is None:  # nothing reads intermediate values: spare the writes
                return
            trial.report(rec.val_score, step=i)
            if trial.should_prune():
                trial.set_user_attr(
                    "cost",
                    {
                        "samples": tr.samples_seen,
                        "optimizer_steps": tr.optimizer_steps,
                        "wall_time": time.perf_counter() - t0,
                        "train_time": tr.wall_time,
                        "intervals": i,
                    },
                )
                trial.set_user_attr("val_trace", val_trace)
                raise optuna.TrialPruned()

        out = run_single(spec, hp, params_seed(seed, hp), on_interval=on_interval)
        trial.set_user_attr(
            "cost",
            {
                "samples": out.samples,
                "optimizer_steps": out.optimizer_steps,
                # run_single's wall time leaves out its final test evaluation (reporting only)
                "wall_time": suggest_time + out.wall_time,
                "train_time": out.train_time,
                "intervals": out.intervals,
            },
        )
        trial.set_user_attr(
            "result",
            {
                "val_score": _num(out.val_score),
                "test_score": _num(out.test_score),
                "test_norm": _num(out.test_norm),
                "diverged": out.diverged,
            },
        )
        trial.set_user_attr("val_trace", val_trace)
        trial.set_user_attr("trace", [_json_row(r) for r in out.trace])
        return out.val_norm

    done = found
    while done < n_trials:
        study.sampler = make_sampler(sampler, trial_seed(seed, done), n_trials)
        left = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if left:
            trial = optuna.trial.Trial(study, left[0]._trial_id)
            if "cost" in left[0].user_attrs:  # what the killed attempt had recorded
                trial.set_user_attr("killed_cost", left[0].user_attrs["cost"])
        else:
            trial = study.ask()
        _run_trial(study, trial, objective)
        done += 1
    return collect(study, found=found)


def _run_trial(study, trial, objective) -> None:
    """Run ``objective`` on ``trial`` and tell the study how it ended (what
    ``Study.optimize`` does, for a trial that may be a resumed one)."""
    import warnings

    import optuna
    from optuna.trial import TrialState

    try:
        with warnings.catch_warnings():
            # A resumed trial reports again the intervals its killed run had reported.
            warnings.filterwarnings("ignore", message="The reported value is ignored")
            value = objective(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    study.tell(trial, value)


def collect(study, found: int = 0) -> StudyOutcome:
    """Records of every trial in a study, its pick and its total cost."""
    from optuna.trial import TrialState

    trials: list[TrialRecord] = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == TrialState.WAITING:
            continue
        # A trial run again after a kill is charged for both attempts.
        cost, killed = t.user_attrs.get("cost", {}), t.user_attrs.get("killed_cost", {})
        cost = {k: cost.get(k, 0) + killed.get(k, 0) for k in set(cost) | set(killed)}
        res = t.user_attrs.get("result", {})
        complete = t.state == TrialState.COMPLETE
        trials.append(
            TrialRecord(
                number=t.number,
                state=t.state.name,
                hp=dict(t.params),
                val_score=res.get("val_score") if complete else None,
                val_norm=float(t.value) if complete and t.value is not None else None,
                test_score=res.get("test_score") if complete else None,
                test_norm=res.get("test_norm") if complete else None,
                samples=int(cost.get("samples", 0)),
                optimizer_steps=int(cost.get("optimizer_steps", 0)),
                wall_time=float(cost.get("wall_time", 0.0)),
                train_time=float(cost.get("train_time", 0.0)),
                intervals=int(cost.get("intervals", 0)),
                diverged=bool(res.get("diverged", False)),
                val_trace=list(t.user_attrs.get("val_trace", [])),
                trace=list(t.user_attrs.get("trace", [])),
            )
        )
    best = best_by_validation(trials)
    return StudyOutcome(
        trials=trials,
        best=best,
        samples=sum(t.samples for t in trials),
        optimizer_steps=sum(t.optimizer_steps for t in trials),
        wall_time=sum(t.wall_time for t in trials),
        train_time=sum(t.train_time for t in trials),
        found=found,
    )


def best_by_validation(trials: list[TrialRecord]) -> TrialRecord | None:
    """The complete trial with the highest normalised validation score (earliest on ties)."""
    done = [t for t in trials if t.state == "COMPLETE" and t.val_norm is not None]
    if not done:
        return None
    return max(done, key=lambda t: (t.val_norm, -t.number))


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _json_row(r: dict[str, Any]) -> dict[str, Any]:
    return {k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()}
