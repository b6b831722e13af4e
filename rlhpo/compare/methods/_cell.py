"""One cell of a comparison (a method on a task from a seed and a start), the named
starts, and turning what a method ran into the rows of the comparison's CSV files."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhpo.compare.methods._base import CellRun, Method, MethodError

# Starting hyperparameters of single-run methods: the one registry of named starts.
from rlhpo.starts import NAMED_STARTS as STARTS
from rlhpo.starts import start_hp as named_start_hp
from rlhpo.tasks.spec import TaskSpec

ANY_START = "any"


def start_hp(spec: TaskSpec, start: str) -> dict[str, Any]:
    """The starting hyperparameters called ``start`` for ``spec``."""
    if start not in STARTS:
        raise MethodError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    return named_start_hp(spec, start)


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


@dataclass
class Cell:
    """One unit of work: a method on a task from a seed (and a start)."""

    method: Method
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


def execute_cell(cell: Cell) -> CellOutput:
    """Run one cell (in a worker process or a Ray task) and log it to W&B/JSONL."""
    from rlhpo.runtime import limit_threads

    limit_threads()
    done = cell.method.run(cell)
    output = cell_rows(cell, done)
    _log(cell, output)
    return output


def cell_rows(cell: Cell, done: CellRun) -> CellOutput:
    """The results row and the trace rows of a finished cell (the same for every method)."""
    m, spec, out = cell.method, cell.spec, done.outcome
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
        "runs": done.runs,
        "pruned": done.pruned,
        "diverged": out.diverged,
        "final_lr": out.hp.get("lr"),
        "final_batch_size": out.hp.get("batch_size"),
        "final_dropout": out.hp.get("dropout"),
        "detail": json.dumps(done.detail, sort_keys=True),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if cell.is_reference:
        row["steps_ratio"] = row["compute_ratio"] = 1.0
    base = {"method": m.label, "start": cell.start, "task": spec.name, "seed": cell.seed}
    trace = [{**base, "trial": done.trial, **r} for r in out.trace]
    return CellOutput(row=row, trace=trace, trials=done.trials)


def _ratio(a: float, b: float | None) -> float:
    return a / b if b else float("nan")


def _log(cell: Cell, output: CellOutput) -> None:
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
        for r in output.trace:
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
        for t in output.trials:
            tr.log({f"trial/{k}": v for k, v in t.items() if k not in ("method", "task", "seed")})
        tr.summary({k: v for k, v in output.row.items() if k != "detail"})
        chosen = json.loads(output.row["detail"]).get("chosen_trial")
        for t in output.trials:
            if t["trial"] == chosen:  # the summary of trial/* shows the pick, not the last trial
                tr.summary(
                    {f"trial/{k}": v for k, v in t.items() if k not in ("method", "task", "seed")}
                )
