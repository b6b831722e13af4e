"""Task families: ranges from which a suite draws task instances under its seed.

In the spirit of DACBench instance sets and Procgen levels: the benchmark is
data. A ``[families.NAME]`` table in a suite file declares::

    instances = 4                            # how many tasks to draw
    model = ["mlp", "resmlp"]                # a string, or a list to choose from
    datasets = { wine = {}, make_classification = { n_samples = [600, 1500] } }
    width = [32, 128]                        # [low, high]: uniform (integers if both are)
    depth = [1, 3]
    heads = [2, 4]                           # attention models; width is rounded to a multiple
    norm = ["pre", "post"]                   # LayerNorm placement (resmlp, encoder)
    budget_samples = [6000, 20000]
    intervals = [10, 50]                     # number of decisions per run
    optimizer = ["adam", "adamw", "sgd"]     # SGD runs with momentum 0.9
    weight_decay = { log = [1e-5, 1e-2] }    # {log = [low, high]}: log-uniform
    start = { lr = { choice = [[1e-5, 3e-2], [1e-4, 1e-2]] } }  # {choice = [...]}: one of
    pretrain = { budget_samples = [80000, 160000] }  # fine-tuning: see TaskSpec.pretrain

A family with a ``pretrain`` table fine-tunes: each instance's body is pretrained
on its dataset's source task (seeded by the suite seed unless the table gives
``seed``) and gets a new head.

Numbers given as ``[low, high]`` are uniform ranges, lists of strings are choices,
``{log = [low, high]}`` is log-uniform and ``{choice = [...]}`` picks one of any
values. Everything else is fixed and merged over the suite's ``[defaults]``.
Every instance is an ordinary :class:`~rlhpo.tasks.spec.TaskSpec`, named
``FAMILY-NN-DATASET``; its ``family`` field is the family's name.

The draws of a family depend only on the suite seed and the family name, so
adding a family does not change the instances of another.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhpo.tasks.spec import DATASETS, MODELS, OPTIMIZERS, SpecError, check_pretrain

INSTANCES_CAP = 64
_FAMILY_KEYS = {
    "description",
    "instances",
    "model",
    "datasets",
    "width",
    "depth",
    "heads",
    "norm",
    "budget_samples",
    "intervals",
    "optimizer",
    "weight_decay",
    "start",
    "default",
    "space",
    "val_fraction",
    "test_fraction",
    "pretrain",
}
_NORMS = ("pre", "post")
# Family keys that become model arguments, and their caps.
_ARCH_CAPS = {"width": 1024, "depth": 12, "heads": 16}


@dataclass(frozen=True)
class Family:
    """A validated family declaration (the ranges, not yet drawn)."""

    name: str
    instances: int
    models: tuple[str, ...]
    datasets: dict[str, dict[str, Any]]
    ranges: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)  # defaults + fixed keys
    description: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "instances": self.instances,
            "models": list(self.models),
            "datasets": {d: dict(a) for d, a in self.datasets.items()},
            "ranges": dict(self.ranges),
            "description": self.description,
        }


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_range(where: str, v: Any) -> None:
    """A draw spec: [low, high] numbers, a list of choices, {log=...} or {choice=...}."""
    if isinstance(v, dict):
        if len(v) != 1 or next(iter(v)) not in ("log", "choice", "range"):
            raise SpecError(
                f"{where}: a drawn value must be {{log = [low, high]}}, {{choice = [...]}} or "
                f"{{range = [low, high]}}, got {v!r}"
            )
        kind, arg = next(iter(v.items()))
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise SpecError(f"{where}: choice is empty: {v!r}")
            return
        _check_bounds(where, arg)
        if kind == "log" and arg[0] <= 0:
            raise SpecError(f"{where}: a log range needs low > 0, got {v!r}")
        return
    if isinstance(v, list):
        if not v:
            raise SpecError(f"{where}: range is empty: []")
        if all(_is_num(x) for x in v):
            _check_bounds(where, v)


def _check_bounds(where: str, arg: Any) -> None:
    if not (isinstance(arg, list) and len(arg) == 2 and all(_is_num(x) for x in arg)):
        raise SpecError(f"{where}: range must be [low, high], got {arg!r}")
    if not arg[0] < arg[1]:
        raise SpecError(f"{where}: range is empty or inverted: {arg!r}")


def _extremes(v: Any) -> list[Any]:
    """The values a draw spec can reach at its ends (all of them for a choice)."""
    if isinstance(v, dict):
        kind, arg = next(iter(v.items()))
        return list(arg)
    if isinstance(v, list):
        return list(v)
    return [v]


def parse_families(src: str, raw: Any, defaults: dict[str, Any]) -> list[Family]:
    """Validate every ``[families.NAME]`` table; nothing is drawn or built here."""
    from rlhpo.tasks.datasets import DATASET_ARGS, DATASET_CAPS, check_dataset_args

    if not isinstance(raw, dict):
        raise SpecError(f"{src}: key 'families' must be a table, got {raw!r}")
    out = []
    for name, f in raw.items():
        p = f"families.{name}."
        if not isinstance(f, dict):
            raise SpecError(f"{src}: key 'families.{name}' must be a table, got {f!r}")
        for k in f:
            if k not in _FAMILY_KEYS:
                raise SpecError(
                    f"{src}: unknown key '{p}{k}' (allowed: {', '.join(sorted(_FAMILY_KEYS))})"
                )
        n = f.get("instances")
        if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= INSTANCES_CAP):
            raise SpecError(f"{src}: key '{p}instances' must be in [1, {INSTANCES_CAP}], got {n!r}")
        models = _choices(src, p, "model", f.get("model"), MODELS, required=True)
        ds = f.get("datasets")
        if not isinstance(ds, dict) or not ds:
            raise SpecError(
                f"{src}: key '{p}datasets' must be a non-empty table of dataset -> args, got {ds!r}"
            )
        for d, args in ds.items():
            if d not in DATASETS:
                raise SpecError(
                    f"{src}: key '{p}datasets' names unknown dataset {d!r} "
                    f"(known: {', '.join(DATASETS)})"
                )
            if not isinstance(args, dict):
                raise SpecError(f"{src}: key '{p}datasets.{d}' must be a table, got {args!r}")
            for k, v in args.items():
                if k not in DATASET_ARGS[d]:
                    check_dataset_args(d, {k: v}, f"{src}: key '{p}datasets.{d}'")
                _check_range(f"{src}: key '{p}datasets.{d}.{k}'", v)
            # Every value a draw can reach must be a valid size (caps included), and
            # the low and high ends together must pass the cross-key checks.
            for k, v in args.items():
                cap = DATASET_CAPS.get(k)
                for x in _extremes(v):
                    if cap is not None and _is_num(x) and x > cap:
                        raise SpecError(
                            f"{src}: key '{p}datasets.{d}': key {k!r} must be <= {cap} "
                            f"(the cap), got {x!r}"
                        )
            for end in (0, -1):
                at_end = {k: _extremes(v)[end] for k, v in args.items()}
                check_dataset_args(d, at_end, f"{src}: key '{p}datasets.{d}'")
        ranges: dict[str, Any] = {}
        for k in ("width", "depth", "heads", "budget_samples", "intervals", "weight_decay"):
            if k in f:
                v = f[k]
                _check_range(f"{src}: key '{p}{k}'", v)
                for x in _extremes(v):
                    if not _is_num(x) or x < 0 or (k != "weight_decay" and x < 1):
                        raise SpecError(
                            f"{src}: key '{p}{k}' holds {x!r}, must be a positive number"
                        )
                    cap = _ARCH_CAPS.get(k)
                    if cap is not None and x > cap:
                        raise SpecError(
                            f"{src}: key '{p}{k}' must be <= {cap} (the cap), got {x!r}"
                        )
                ranges[k] = v
        if "optimizer" in f:
            ranges["optimizer"] = list(_choices(src, p, "optimizer", f["optimizer"], OPTIMIZERS))
        if "norm" in f:
            ranges["norm"] = list(_choices(src, p, "norm", f["norm"], _NORMS))
        tables = ("start", "default", "space", "pretrain")
        base = _merge(defaults, {k: f[k] for k in tables if k in f})
        for table in tables:
            for k, v in (base.get(table) or {}).items():
                if isinstance(v, dict) or (table == "pretrain" and isinstance(v, list)):
                    _check_range(f"{src}: key '{p}{table}.{k}'", v)
        if "pretrain" in base:
            # Both ends of every range, for every model and dataset: pretraining past
            # the caps is refused here, before any instance is built.
            pre = base["pretrain"]
            if not isinstance(pre, dict):
                raise SpecError(f"{src}: key '{p}pretrain' must be a table, got {pre!r}")
            for end in (0, -1):
                at_end = {k: _extremes(v)[end] for k, v in pre.items()}
                for m in models:
                    for d in ds:
                        check_pretrain(at_end, m, d, f"{src}: key '{p}pretrain'")
        for k in ("val_fraction", "test_fraction"):
            if k in f:
                base[k] = f[k]
        out.append(
            Family(
                name=name,
                instances=n,
                models=models,
                datasets={d: dict(a) for d, a in ds.items()},
                ranges=ranges,
                base=base,
                description=str(f.get("description", "")),
            )
        )
        # Draw once now so that a family no instance of which can be built fails here.
        from rlhpo.tasks.spec import parse_task

        for tname, traw in draw_instances(out[-1], 0):
            try:
                parse_task(tname, traw, src)
            except SpecError as e:
                why = str(e).removeprefix(f"{src}: ")
                raise SpecError(
                    f"{src}: family {name!r} draws a task that is refused: {why}"
                ) from None
    return out


def _choices(src, p, key, v, known, required=False) -> tuple[str, ...]:
    if v is None:
        if required:
            raise SpecError(f"{src}: missing key '{p}{key}'")
        return ()
    vals = v if isinstance(v, list) else [v]
    if not vals:
        raise SpecError(f"{src}: key '{p}{key}' is an empty choice: []")
    for x in vals:
        if x not in known:
            raise SpecError(f"{src}: key '{p}{key}' is unknown: {x!r} (known: {', '.join(known)})")
    return tuple(vals)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _draw(rng: np.random.Generator, v: Any) -> Any:
    if isinstance(v, dict):
        kind, arg = next(iter(v.items()))
        if kind == "choice":
            return arg[int(rng.integers(len(arg)))]
        lo, hi = arg
        if kind == "log":
            x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            return (
                int(round(x)) if isinstance(lo, int) and isinstance(hi, int) else float(f"{x:.4g}")
            )
        v = arg
    if isinstance(v, list):
        if len(v) == 2 and all(_is_num(x) for x in v):
            lo, hi = v
            if isinstance(lo, int) and isinstance(hi, int):
                return int(rng.integers(lo, hi + 1))
            return float(f"{rng.uniform(lo, hi):.4g}")  # 4 digits: readable task tables
        return v[int(rng.integers(len(v)))]
    return v


def _model_args(model: str, width: int, depth: int, heads: int, norm: str) -> dict[str, Any]:
    """Map the family's architecture draws onto one model's arguments."""
    if model == "mlp":
        return {"hidden": [width] * depth}
    if model == "resmlp":
        return {"width": width, "blocks": depth, "norm": norm}
    if model in ("cnn1d", "cnn2d"):
        return {"channels": [width] * depth, "hidden": 64}
    if model in ("gru", "lstm"):
        return {"hidden": width, "embed": max(8, width // 2)}
    if model == "transformer":
        return {"hidden": width, "layers": depth, "heads": heads, "intermediate": 2 * width}
    args = {"hidden": width, "layers": depth, "heads": heads, "intermediate": 2 * width}
    if model == "encoder":
        args["norm"] = norm
    return args


def family_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one family's draws: the suite seed and the family name only."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def draw_instances(family: Family, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """``family.instances`` task tables (names and raw dicts for ``parse_task``)."""
    rng = family_rng(seed, family.name)
    r = family.ranges
    out = []
    datasets = list(family.datasets)
    # Cycle through the datasets from a drawn offset, so that every one appears
    # when there are at least as many instances as datasets.
    offset = int(rng.integers(len(datasets)))
    for i in range(family.instances):
        model = family.models[int(rng.integers(len(family.models)))]
        dataset = datasets[(i + offset) % len(datasets)]
        dargs = {k: _draw(rng, v) for k, v in family.datasets[dataset].items()}
        heads = int(_draw(rng, r.get("heads", 2)))
        width = int(_draw(rng, r.get("width", 64)))
        width = heads * math.ceil(width / heads)
        depth = int(_draw(rng, r.get("depth", 2)))
        norm = str(_draw(rng, r.get("norm", "pre")))
        task: dict[str, Any] = _draw_tables(rng, family.base)
        task.update(
            family=family.name,
            dataset=dataset,
            dataset_args=dargs,
            model=model,
            model_args=_model_args(model, width, depth, heads, norm),
            metric="r2" if dataset in ("make_regression", "friedman1") else "accuracy",
            data_seed=int(rng.integers(1000)),
            description=f"drawn from family {family.name!r}",
        )
        if "pretrain" in task:
            task["pretrain"] = {"seed": int(seed), **task["pretrain"]}
        for k in ("budget_samples", "intervals"):
            if k in r:
                task[k] = int(_draw(rng, r[k]))
        if "optimizer" in r:
            task["optimizer"] = _draw(rng, r["optimizer"])
        if "weight_decay" in r:
            task["weight_decay"] = float(_draw(rng, r["weight_decay"]))
        out.append((f"{family.name}-{i:02d}-{dataset}", task))
    return out


def _draw_tables(rng: np.random.Generator, base: dict[str, Any]) -> dict[str, Any]:
    """Copy the fixed part, drawing the dict-form specs inside start/default/space."""
    out = {}
    for k, v in base.items():
        if k == "pretrain" and isinstance(v, dict):  # every value a draw spec or fixed
            out[k] = {kk: _draw(rng, vv) for kk, vv in v.items()}
        elif k in ("start", "default", "space") and isinstance(v, dict):
            out[k] = {kk: _draw(rng, vv) if isinstance(vv, dict) else vv for kk, vv in v.items()}
        else:
            out[k] = v
    return out
