"""Task specs and suites, read from TOML and validated strictly.

A suite file holds ``name``, the ``train`` and ``test`` lists of task names, an
optional ``[defaults]`` table merged under every task, and one ``[tasks.NAME]``
table per task. It may also declare ``[families.NAME]`` tables with ranges
(see :mod:`rlhpo.tasks.families`): their instances, drawn under the suite's
``seed``, join the train split. Every error names the file, the key and the bad
value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from rlhpo.knobs import ALL_KNOBS, KNOBS, REGISTRY, SearchSpace

DATASETS = (
    "mnist1d",
    "digits",
    "wine",
    "breast_cancer",
    "make_classification",
    "make_regression",
    "friedman1",
    "sequences",
    "shapes",
    "parity",
    "counting",
    "lm_copy",
    "lm_reverse",
    "lm_sort",
    "latent",
)
MODELS = (
    "mlp",
    "resmlp",
    "cnn1d",
    "cnn2d",
    "gru",
    "lstm",
    "transformer",
    "encoder",
    "decoder",
)
METRICS = ("accuracy", "r2")
OPTIMIZERS = ("adam", "adamw", "sgd")
REGRESSION_DATASETS = ("make_regression", "friedman1")
# Which datasets produce token sequences (only sequence models take them).
SEQUENCE_DATASETS = ("sequences", "parity", "counting")
LM_DATASETS = ("lm_copy", "lm_reverse", "lm_sort")
IMAGE_DATASETS = ("digits", "shapes")
BUDGET_CAP = 10_000_000
INTERVALS_CAP = 200
# Datasets that have a source task a body can be pretrained on (see ``pretrain``).
PRETRAIN_DATASETS = ("latent",)
# Models whose body (everything but the last Linear, the head) can be pretrained.
PRETRAIN_MODELS = ("mlp", "resmlp", "cnn1d")
# The ``pretrain`` table: its keys, their defaults and their [low, high] caps, checked
# when a suite is read, so a suite asking for more is refused before anything is built.
# Parameters x samples is capped too, once the body is built and before it trains
# (rlhpo.trainees.pretrained.PRETRAIN_WORK_CAP): pretraining stays under 2 minutes.
PRETRAIN_KEYS: dict[str, tuple[int | float, int | float, int | float]] = {
    "samples": (8000, 100, 20000),  # the source dataset's size
    "budget_samples": (160000, 1, 400000),  # samples processed while pretraining
    "lr": (1e-3, 1e-6, 1.0),
    "batch_size": (64, 1, 1024),
    "seed": (0, 0, 2**31 - 1),
}

_TASK_KEYS = {
    "dataset",
    "dataset_args",
    "model",
    "model_args",
    "metric",
    "optimizer",
    "budget_samples",
    "intervals",
    "data_seed",
    "val_fraction",
    "test_fraction",
    "space",
    "start",
    "default",
    "description",
    "family",
    "weight_decay",
    "pretrain",
}
_SPACE_KEYS = set(ALL_KNOBS)
_SUITE_KEYS = {"name", "description", "train", "test", "defaults", "tasks", "seed", "families"}


class SpecError(ValueError):
    """A task or suite file breaks a rule; the message names file, key and value."""


class StartDistribution(SearchSpace):
    """Where episodes start: bounds per knob inside the task's space, drawn as each
    knob declares (lr log-uniform, batch size from a list, dropout uniform)."""


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to build one training run: data, model, metric, budget, space."""

    name: str
    dataset: str
    model: str
    metric: str
    budget_samples: int
    intervals: int
    space: SearchSpace
    start: StartDistribution
    default: dict[str, float]
    dataset_args: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "adam"
    data_seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    description: str = ""
    source: str = ""
    family: str = ""  # the family the task was drawn from (else its model)
    weight_decay: float | None = None  # None: the optimizer's default (AdamW 0.01, else 0)
    # Fine-tuning: the body is pretrained on the dataset's source task with these
    # settings (``PRETRAIN_KEYS``, all filled in) and cached; empty: trained from scratch.
    pretrain: dict[str, Any] = field(default_factory=dict)

    @property
    def interval_samples(self) -> int:
        return math.ceil(self.budget_samples / self.intervals)

    def scaled(self, budget_scale: float) -> TaskSpec:
        """The same task with its sample budget multiplied (for tests and quick demos)."""
        if not budget_scale > 0:
            raise SpecError(f"budget_scale must be > 0, got {budget_scale!r}")
        from dataclasses import replace

        budget = max(self.intervals, int(round(self.budget_samples * budget_scale)))
        return replace(self, budget_samples=budget)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dataset": self.dataset,
            "model": self.model,
            "metric": self.metric,
            "budget_samples": self.budget_samples,
            "intervals": self.intervals,
            "optimizer": self.optimizer,
            "weight_decay": self.weight_decay,
            "family": self.family or self.model,
            "dataset_args": dict(self.dataset_args),
            "model_args": dict(self.model_args),
            "data_seed": self.data_seed,
            "start": {
                "lr": list(self.start.lr),
                "batch_size": list(self.start.batch_size),
                "dropout": list(self.start.dropout),
            },
            "default": dict(self.default),
            "description": self.description,
            # Only when set, so that the summaries of from-scratch tasks stay as they were.
            **({"pretrain": dict(self.pretrain)} if self.pretrain else {}),
        }


@dataclass(frozen=True)
class Fold:
    """One leave-one-family-out validation fold: train on ``train``, select on ``val``."""

    family: str
    train: tuple[str, ...]
    val: tuple[str, ...]


@dataclass(frozen=True)
class Suite:
    """A named set of tasks with a train and a test split (and, when drawn from
    families, the families and the leave-one-family-out folds over them)."""

    name: str
    tasks: dict[str, TaskSpec]
    train: tuple[str, ...]
    test: tuple[str, ...]
    source: str = ""
    description: str = ""
    seed: int = 0
    families: tuple[Any, ...] = ()  # rlhpo.tasks.families.Family, declaration order

    def folds(self) -> list[Fold]:
        """Leave one train family out: its tasks are the fold's validation tasks.

        Used only to select policies; the test split takes no part in it.
        """
        by_family: dict[str, list[str]] = {}
        for n in self.train:
            t = self.tasks[n]
            by_family.setdefault(t.family or t.model, []).append(n)
        if len(by_family) < 2:
            return []
        return [
            Fold(fam, tuple(n for n in self.train if n not in names), tuple(names))
            for fam, names in by_family.items()
        ]

    def split(self, split: str) -> list[TaskSpec]:
        if split == "train":
            names = self.train
        elif split == "test":
            names = self.test
        elif split == "all":
            names = self.train + self.test
        else:
            raise SpecError(f"split must be one of train, test, all; got {split!r}")
        return [self.tasks[n] for n in names]

    def task(self, name: str) -> TaskSpec:
        if name not in self.tasks:
            raise SpecError(
                f"{self.source}: no task named {name!r}; known tasks: {', '.join(sorted(self.tasks))}"
            )
        return self.tasks[name]


def envs_dir() -> Path:
    """Folder holding the shipped suites, inside the package (``RLHPO_ENVS`` overrides it)."""
    from rlhpo.shipped import suites_dir

    return suites_dir()


def resolve_suite_path(suite: str | os.PathLike[str]) -> Path:
    """A suite name (``default``) or a path to a TOML file."""
    p = Path(suite)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise SpecError(f"suite file {str(p)!r} does not exist")
        return p
    candidate = envs_dir() / f"{suite}.toml"
    if not candidate.is_file():
        known = sorted(f.stem for f in envs_dir().glob("*.toml"))
        raise SpecError(f"unknown suite {str(suite)!r}; known suites: {', '.join(known)}")
    return candidate


_SUITE_CACHE: dict[tuple[str, float], Suite] = {}


def load_suite(suite: str | os.PathLike[str] = "default") -> Suite:
    """Load and validate a suite by name or path (cached by path and mtime)."""
    path = resolve_suite_path(suite)
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _SUITE_CACHE:
        _SUITE_CACHE[key] = _parse_suite(path)
    return _SUITE_CACHE[key]


def _parse_suite(path: Path) -> Suite:
    src = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{src}: not valid TOML: {e}") from e
    _check_keys(src, "", raw, _SUITE_KEYS)
    name = _get(src, raw, "name", str, "")
    tasks_raw = _get(src, raw, "tasks", dict, "")
    if not tasks_raw:
        raise SpecError(f"{src}: 'tasks' must hold at least one [tasks.NAME] table")
    defaults = _get(src, raw, "defaults", dict, "", required=False) or {}
    _check_keys(src, "defaults.", defaults, _TASK_KEYS)
    seed = _get(src, raw, "seed", int, "", required=False) or 0
    if not 0 <= seed <= PRETRAIN_KEYS["seed"][2]:
        raise SpecError(
            f"{src}: key 'seed' must be in [0, {PRETRAIN_KEYS['seed'][2]}], got {seed!r}"
        )
    tasks: dict[str, TaskSpec] = {}
    for tname, traw in tasks_raw.items():
        if not isinstance(traw, dict):
            raise SpecError(f"{src}: key 'tasks.{tname}' must be a table, got {traw!r}")
        merged = _merge(defaults, traw)
        if isinstance(merged.get("pretrain"), dict) and "seed" not in merged["pretrain"]:
            # A body is deterministic from the suite seed unless the task pins its own.
            merged["pretrain"] = {**merged["pretrain"], "seed": seed}
        tasks[tname] = parse_task(tname, merged, src)
    from rlhpo.tasks.families import draw_instances, parse_families

    families = parse_families(src, raw.get("families", {}), defaults)
    drawn: list[str] = []
    for fam in families:
        for tname, traw in draw_instances(fam, seed):
            if tname in tasks:
                raise SpecError(f"{src}: drawn task {tname!r} clashes with [tasks.{tname}]")
            tasks[tname] = parse_task(tname, traw, src)
            drawn.append(tname)
    splits = {}
    for split in ("train", "test"):
        names = _get(src, raw, split, list, "", required=not (families and split == "train"))
        names = names or []
        for n in names:
            if not isinstance(n, str) or n not in tasks:
                raise SpecError(f"{src}: key '{split}' names unknown task {n!r}")
        if len(set(names)) != len(names):
            raise SpecError(f"{src}: key '{split}' lists a task twice: {names!r}")
        splits[split] = tuple(names)
    overlap = set(splits["train"]) & set(splits["test"])
    if overlap:
        raise SpecError(f"{src}: tasks in both train and test: {sorted(overlap)!r}")
    splits["train"] = splits["train"] + tuple(drawn)
    _check_held_out(src, tasks, splits["train"], splits["test"], families)
    if not splits["train"]:
        raise SpecError(f"{src}: key 'train' must list at least one task, got []")
    return Suite(
        name=name,
        tasks=tasks,
        train=splits["train"],
        test=splits["test"],
        source=src,
        description=str(raw.get("description", "")),
        seed=seed,
        families=tuple(families),
    )


def _check_held_out(src: str, tasks, train, test, families) -> None:
    """Refuse a test task whose model x dataset combination a train task or family has."""
    seen: dict[tuple[str, str], str] = {}
    for fam in families:
        for m in fam.models:
            for d in fam.datasets:
                seen.setdefault((m, d), f"family {fam.name!r}")
    for n in train:
        seen.setdefault((tasks[n].model, tasks[n].dataset), f"train task {n!r}")
    for n in test:
        t = tasks[n]
        where = seen.get((t.model, t.dataset))
        if where:
            raise SpecError(
                f"{src}: test task {n!r} (model {t.model!r} on dataset {t.dataset!r}) overlaps "
                f"the train split: {where} has that combination"
            )


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _check_keys(src: str, prefix: str, raw: dict, allowed: set[str]) -> None:
    for k in raw:
        if k not in allowed:
            raise SpecError(
                f"{src}: unknown key '{prefix}{k}' (allowed: {', '.join(sorted(allowed))})"
            )


def _get(src: str, raw: dict, key: str, typ: type | tuple, prefix: str, required: bool = True):
    if key not in raw:
        if required:
            raise SpecError(f"{src}: missing key '{prefix}{key}'")
        return None
    v = raw[key]
    ok = isinstance(v, typ) and not (typ in (int, float) and isinstance(v, bool))
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        ok = True
        v = float(v)
    if not ok:
        tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise SpecError(f"{src}: key '{prefix}{key}' must be {tname}, got {v!r}")
    return v


def _range(src: str, raw: dict, key: str, prefix: str, lo_ok: float, hi_ok: float, log=False):
    v = _get(src, raw, key, list, prefix)
    if len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise SpecError(f"{src}: key '{prefix}{key}' must be [low, high], got {v!r}")
    lo, hi = float(v[0]), float(v[1])
    if not (lo < hi):
        raise SpecError(f"{src}: key '{prefix}{key}' is empty or inverted: {v!r}")
    if lo < lo_ok or hi > hi_ok or (log and lo <= 0):
        raise SpecError(f"{src}: key '{prefix}{key}' must lie in [{lo_ok}, {hi_ok}], got {v!r}")
    return lo, hi


def _batch_list(src: str, raw: dict, key: str, prefix: str) -> tuple[int, ...]:
    v = _get(src, raw, key, list, prefix)
    if not v or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v):
        raise SpecError(
            f"{src}: key '{prefix}{key}' must be a non-empty list of positive integers, got {v!r}"
        )
    if list(v) != sorted(set(v)):
        raise SpecError(f"{src}: key '{prefix}{key}' must be strictly increasing, got {v!r}")
    return tuple(v)


def _parse_knobs(
    src: str, raw: dict[str, Any], p: str
) -> tuple[SearchSpace, StartDistribution, dict[str, Any]]:
    """The ``space``, ``start`` and ``default`` tables, for the knobs the space names
    (the required ones always; opt-in ones such as weight_decay when named)."""
    sp = _get(src, raw, "space", dict, p)
    _check_keys(src, f"{p}space.", sp, _SPACE_KEYS)
    names = [k for k in REGISTRY if k in KNOBS or k in sp]

    def parse(table: dict, k: str, prefix: str, lo: float, hi: float) -> tuple:
        knob = REGISTRY[k]
        if knob.kind == "choice":
            return _batch_list(src, table, k, prefix)
        return _range(src, table, k, prefix, lo, hi, log=knob.log)

    bounds = {k: parse(sp, k, f"{p}space.", *REGISTRY[k].limits) for k in names}
    space = SearchSpace(bounds)

    df = _get(src, raw, "default", dict, p)
    _check_keys(src, f"{p}default.", df, set(names))
    default = {
        k: _get(src, df, k, int if REGISTRY[k].kind == "choice" else float, f"{p}default.")
        for k in names
    }
    for k, v in default.items():
        if not space.contains(k, v):
            raise SpecError(
                f"{src}: key '{p}default.{k}' = {v!r} lies outside the space {space.describe(k)}"
            )

    st = _get(src, raw, "start", dict, p)
    _check_keys(src, f"{p}start.", st, set(names))
    sb = {}
    for k in names:
        b = bounds[k]
        if k not in KNOBS and k not in st:
            # An opt-in knob without a start range starts at its default.
            sb[k] = (default[k],) if REGISTRY[k].kind == "choice" else (default[k], default[k])
        elif REGISTRY[k].kind == "choice":
            sb[k] = parse(st, k, f"{p}start.", 0, 0)
            for v in sb[k]:
                if v not in b:
                    raise SpecError(
                        f"{src}: key '{p}start.{k}' holds {v!r}, not in space {list(b)!r}"
                    )
        else:
            sb[k] = parse(st, k, f"{p}start.", b[0], b[1])
    return space, StartDistribution(sb), default


def parse_task(name: str, raw: dict[str, Any], src: str = "<task>") -> TaskSpec:
    """Validate one task table (after defaults were merged in)."""
    p = f"tasks.{name}."
    _check_keys(src, p, raw, _TASK_KEYS)
    dataset = _get(src, raw, "dataset", str, p)
    if dataset not in DATASETS:
        raise SpecError(
            f"{src}: key '{p}dataset' is unknown: {dataset!r} (known: {', '.join(DATASETS)})"
        )
    model = _get(src, raw, "model", str, p)
    if model not in MODELS:
        raise SpecError(f"{src}: key '{p}model' is unknown: {model!r} (known: {', '.join(MODELS)})")
    _check_fit(src, p, model, dataset)
    metric = _get(src, raw, "metric", str, p)
    if metric not in METRICS:
        raise SpecError(
            f"{src}: key '{p}metric' is unknown: {metric!r} (known: {', '.join(METRICS)})"
        )
    regression = dataset in REGRESSION_DATASETS
    if regression != (metric == "r2"):
        raise SpecError(
            f"{src}: key '{p}metric' = {metric!r} does not fit dataset {dataset!r} "
            f"(regression datasets use 'r2', classification ones 'accuracy')"
        )
    optimizer = _get(src, raw, "optimizer", str, p, required=False) or "adam"
    if optimizer not in OPTIMIZERS:
        raise SpecError(
            f"{src}: key '{p}optimizer' is unknown: {optimizer!r} (known: {', '.join(OPTIMIZERS)})"
        )
    wd = _get(src, raw, "weight_decay", float, p, required=False)
    if wd is not None and not 0.0 <= wd <= 1.0:
        raise SpecError(f"{src}: key '{p}weight_decay' must be in [0, 1], got {wd!r}")
    budget = _get(src, raw, "budget_samples", int, p)
    intervals = _get(src, raw, "intervals", int, p)
    if budget < 1:
        raise SpecError(f"{src}: key '{p}budget_samples' must be >= 1, got {budget!r}")
    if budget > BUDGET_CAP:
        raise SpecError(
            f"{src}: key '{p}budget_samples' must be <= {BUDGET_CAP} (the cap), got {budget!r}"
        )
    if not 1 <= intervals <= budget:
        raise SpecError(
            f"{src}: key '{p}intervals' must be in [1, budget_samples], got {intervals!r}"
        )
    if intervals > INTERVALS_CAP:
        raise SpecError(
            f"{src}: key '{p}intervals' must be <= {INTERVALS_CAP} (the cap), got {intervals!r}"
        )
    family = _get(src, raw, "family", str, p, required=False) or model
    data_seed = _get(src, raw, "data_seed", int, p, required=False) or 0
    fractions = {}
    for k in ("val_fraction", "test_fraction"):
        v = _get(src, raw, k, float, p, required=False)
        v = 0.2 if v is None else v
        if not 0.0 < v < 0.5:
            raise SpecError(f"{src}: key '{p}{k}' must be in (0, 0.5), got {v!r}")
        fractions[k] = v

    space, start, default = _parse_knobs(src, raw, p)

    dargs = _get(src, raw, "dataset_args", dict, p, required=False) or {}
    margs = _get(src, raw, "model_args", dict, p, required=False) or {}
    from rlhpo.tasks.datasets import check_dataset_args
    from rlhpo.tasks.models import check_model_args

    check_dataset_args(dataset, dargs, f"{src}: key '{p}dataset_args'")
    check_model_args(model, margs, f"{src}: key '{p}model_args'")
    pretrain = _get(src, raw, "pretrain", dict, p, required=False)
    if pretrain is not None:
        pretrain = check_pretrain(pretrain, model, dataset, f"{src}: key '{p}pretrain'")
    return TaskSpec(
        name=name,
        dataset=dataset,
        model=model,
        metric=metric,
        budget_samples=budget,
        intervals=intervals,
        space=space,
        start=start,
        default=default,
        dataset_args=dargs,
        model_args=margs,
        optimizer=optimizer,
        data_seed=data_seed,
        val_fraction=fractions["val_fraction"],
        test_fraction=fractions["test_fraction"],
        description=str(raw.get("description", "")),
        source=src,
        family=family,
        weight_decay=wd,
        pretrain=pretrain or {},
    )


def check_pretrain(raw: dict[str, Any], model: str, dataset: str, where: str) -> dict[str, Any]:
    """A ``pretrain`` table with its defaults filled in, or a one-line SpecError.

    Checked here, when the suite is read, so that pretraining beyond the caps is
    refused before it starts.
    """
    if dataset not in PRETRAIN_DATASETS:
        raise SpecError(
            f"{where}: pretraining needs a dataset with a source task "
            f"({', '.join(PRETRAIN_DATASETS)}), got dataset {dataset!r}"
        )
    if model not in PRETRAIN_MODELS:
        raise SpecError(
            f"{where}: pretraining needs model {', '.join(PRETRAIN_MODELS)}, got {model!r}"
        )
    for k in raw:
        if k not in PRETRAIN_KEYS:
            raise SpecError(f"{where}: unknown key {k!r} (allowed: {', '.join(PRETRAIN_KEYS)})")
    out: dict[str, Any] = {}
    for k, (default, lo, hi) in PRETRAIN_KEYS.items():
        v = raw.get(k, default)
        if isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            v = float(v) if ok else v
        if not ok:
            raise SpecError(f"{where}: key {k!r} must be {type(default).__name__}, got {v!r}")
        if not lo <= v <= hi:
            raise SpecError(f"{where}: key {k!r} must be in [{lo}, {hi}] (the caps), got {v!r}")
        out[k] = v
    return out


def _check_fit(src: str, p: str, model: str, dataset: str) -> None:
    """Which models take which data: vectors, token labels, next tokens, images."""
    if model == "decoder" or dataset in LM_DATASETS:
        if not (model == "decoder" and dataset in LM_DATASETS):
            raise SpecError(
                f"{src}: key '{p}model' = {model!r} does not fit dataset {dataset!r}: model "
                f"'decoder' takes exactly the next-token datasets ({', '.join(LM_DATASETS)})"
            )
        return
    if model in ("transformer", "encoder") and dataset not in SEQUENCE_DATASETS:
        raise SpecError(
            f"{src}: key '{p}model' = {model!r} needs a token dataset "
            f"({', '.join(SEQUENCE_DATASETS)}), got dataset {dataset!r}"
        )
    if model in ("mlp", "resmlp", "cnn1d", "cnn2d") and dataset in SEQUENCE_DATASETS:
        raise SpecError(
            f"{src}: key '{p}model' = {model!r} does not take the token dataset {dataset!r}"
        )
    if model == "cnn2d" and dataset not in IMAGE_DATASETS:
        raise SpecError(
            f"{src}: key '{p}model' = 'cnn2d' needs an image dataset "
            f"({', '.join(IMAGE_DATASETS)}), got dataset {dataset!r}"
        )
