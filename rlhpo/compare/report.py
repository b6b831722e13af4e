"""The comparison's summary: aggregate tables in ``summary.md`` (and a rich table for
the terminal), computed from ``results.csv``, ``traces.csv`` and ``trials.csv``.

An *entry* is a method from one start (``plateau @ low-lr``); Optuna, PBT and the
warm-up + cosine schedule choose their own hyperparameters and have start ``any``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlhpo.compare import stats
from rlhpo.compare.methods import ANY_START, Method, method_class, registered
from rlhpo.tasks.spec import TaskSpec

REFERENCE = ("static", "default")
_FLOATS = {
    "val_score",
    "test_score",
    "norm_val_score",
    "norm_test_score",
    "samples_ratio",
    "steps_ratio",
    "wall_time",
    "train_time",
    "compute_ratio",
    "final_lr",
    "final_dropout",
    "lr",
    "dropout",
    "val_loss",
    "train_loss",
}
_INTS = {
    "seed",
    "samples",
    "budget_samples",
    "optimizer_steps",
    "runs",
    "pruned",
    "final_batch_size",
    "trial",
    "interval",
    "batch_size",
    "intervals",
}


def typed(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row with numbers and flags parsed (empty -> NaN / None)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in _FLOATS:
            out[k] = float(v) if v not in ("", None) else float("nan")
        elif k in _INTS:
            out[k] = int(float(v)) if v not in ("", None) else None
        elif k == "diverged":
            out[k] = v in ("True", "true", "1")
        else:
            out[k] = v
    return out


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Typed rows of a comparison CSV file (empty if it does not exist)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [typed(r) for r in csv.DictReader(f)]


@dataclass
class Entry:
    """Aggregates of one method from one start."""

    method: str
    start: str
    kind: str  # results.csv's kind column: which Method class ran it
    by_task: dict[str, list[float]] = field(default_factory=dict)  # normalised test, by seed
    raw_by_task: dict[str, list[float]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    iqm: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    poi: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    mean_rank: float = math.nan
    rank_by_task: dict[str, float] = field(default_factory=dict)
    samples_ratio: float = math.nan
    steps_ratio: float = math.nan
    compute_ratio: float = math.nan
    train_ratio: float = math.nan
    wall_time: float = math.nan
    diverged: int = 0
    to_target: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    best_test: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.method} @ {self.start}"

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def method_type(self) -> type[Method]:
        return method_class(self.kind)


@dataclass
class Report:
    entries: list[Entry]
    tasks: list[str]
    metrics: dict[str, str]
    targets: dict[str, float]
    summary_path: Path | None
    plots: list[Path]


def _entry_order(methods: list[Method], starts: list[str], rows) -> list[tuple[str, str]]:
    order: list[tuple[str, str]] = []
    present = {(r["method"], r["start"]) for r in rows}
    if REFERENCE in present:
        order.append(REFERENCE)
    for m in methods:
        for st in [ANY_START] if m.start_independent else starts:
            if (m.label, st) in present and (m.label, st) not in order:
                order.append((m.label, st))
    for k in sorted(present):  # rows of this folder's earlier runs not asked for now
        if k not in order:
            order.append(k)
    return order


def build_entries(
    rows: list[dict[str, Any]],
    traces: list[dict[str, Any]],
    trials: list[dict[str, Any]],
    specs: list[TaskSpec],
    methods: list[Method],
    starts: list[str],
    reps: int = 2000,
) -> tuple[list[Entry], dict[str, float]]:
    """Per-entry statistics (IQM and CIs, probability of improvement, ranks, cost,
    intervals to target) from typed rows."""
    tasks = [s.name for s in specs]
    entries: dict[tuple[str, str], Entry] = {}
    for key in _entry_order(methods, starts, rows):
        entries[key] = Entry(method=key[0], start=key[1], kind="")
    ref_rows = {(r["task"], r["seed"]): r for r in rows if (r["method"], r["start"]) == REFERENCE}
    for r in sorted(rows, key=lambda r: (r["task"], r["seed"])):
        e = entries[(r["method"], r["start"])]
        e.kind = r["kind"]
        e.rows.append(r)
        e.by_task.setdefault(r["task"], []).append(_nan0(r["norm_test_score"]))
        e.raw_by_task.setdefault(r["task"], []).append(r["test_score"])
    ref = entries.get(REFERENCE)
    for e in entries.values():
        groups = [e.by_task.get(t, []) for t in tasks]
        e.iqm = stats.iqm_ci(groups, reps=reps)
        if ref is not None and e is not ref:
            e.poi = stats.poi_ci(groups, [ref.by_task.get(t, []) for t in tasks], reps=reps)
        e.samples_ratio = _median([r["samples_ratio"] for r in e.rows])
        e.steps_ratio = _median([r["steps_ratio"] for r in e.rows])
        e.compute_ratio = _median([r["compute_ratio"] for r in e.rows])
        e.wall_time = _median([r["wall_time"] for r in e.rows])
        e.train_ratio = _median(
            [
                r["train_time"] / ref_rows[(r["task"], r["seed"])]["train_time"]
                for r in e.rows
                if (r["task"], r["seed"]) in ref_rows
            ]
        )
        e.diverged = sum(bool(r["diverged"]) for r in e.rows)
        for t in tasks:
            raw = [v for v in e.raw_by_task.get(t, []) if math.isfinite(v)]
            e.best_test[t] = max(raw) if raw else math.nan
    scores = {
        e.name: {(r["task"], r["seed"]): _nan0(r["norm_test_score"]) for r in e.rows}
        for e in entries.values()
    }
    overall, per_task = stats.mean_ranks(scores)
    for e in entries.values():
        e.mean_rank = overall.get(e.name, math.nan)
        e.rank_by_task = per_task.get(e.name, {})
    targets = _targets(rows, tasks)
    _intervals_to_target(entries, traces, trials, targets)
    return list(entries.values()), targets


def _nan0(v: float) -> float:
    # A missing test score (a run that never produced one) counts as chance.
    return v if v is not None and math.isfinite(v) else 0.0


def _median(values) -> float:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    return float(np.median(a)) if a.size else math.nan


def _targets(rows: list[dict[str, Any]], tasks: list[str]) -> dict[str, float]:
    """Target validation score per task: the static default run's final normalised
    validation score (median over seeds). "Intervals to target" then asks how soon a
    method gets where the default gets at the end."""
    out = {}
    for t in tasks:
        v = [
            r["norm_val_score"]
            for r in rows
            if (r["method"], r["start"]) == REFERENCE and r["task"] == t
        ]
        out[t] = _median(v)
    return out


def _intervals_to_target(entries, traces, trials, targets) -> None:
    first: dict[tuple, float] = {}
    for r in traces:
        key = (r["method"], r["start"], r["task"], r["seed"])
        t = targets.get(r["task"], math.nan)
        if math.isfinite(r["norm_val_score"]) and r["norm_val_score"] >= t and r["interval"] >= 1:
            first[key] = min(first.get(key, math.inf), r["interval"])
    by_study: dict[tuple, list[dict[str, Any]]] = {}
    for r in trials:
        by_study.setdefault((r["method"], r["task"], r["seed"]), []).append(r)
    for e in entries.values():
        for task in targets:
            vals = []
            for r in e.rows:
                if r["task"] != task:
                    continue
                study = by_study.get((e.method, task, r["seed"]))
                reach = e.method_type.intervals_to_target(study, targets[task]) if study else None
                if reach is None:
                    reach = first.get((e.method, e.start, task, r["seed"]), math.inf)
                vals.append(reach)
            if vals:
                reached = sum(math.isfinite(v) for v in vals)
                med = float(np.median(vals)) if reached else math.inf
                e.to_target[task] = (med, reached, len(vals))


# ----------------------------------------------------------------------------
# Rendering


def _ci(t: tuple[float, float, float], digits: int = 3) -> str:
    p, lo, hi = t
    if not math.isfinite(p):
        return "—"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{p:.{digits}f}"
    return f"{p:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _x(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}x" if math.isfinite(v) else "—"


def _target_cell(v: tuple[float, int, int] | None) -> str:
    if v is None:
        return "—"
    med, reached, n = v
    return f"{med:g} ({reached}/{n})" if math.isfinite(med) else f"— ({reached}/{n})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def summary_markdown(
    report: Report,
    cfg: Any,
    meta: dict[str, Any],
    rows: list[dict[str, Any]],
) -> str:
    """The text of summary.md."""
    e_all, tasks = report.entries, report.tasks
    sessions = meta.get("sessions", [])
    total_wall = sum(s.get("wall_time", 0.0) for s in sessions)
    lines = [
        "# Comparison",
        "",
        f"Suite `{meta.get('suite')}`, split `{meta.get('split')}`, tasks: "
        + ", ".join(f"`{t}`" for t in tasks)
        + f"; seeds {', '.join(str(s) for s in cfg.seeds)}; starts "
        + ", ".join(f"`{s}`" for s in cfg.starts)
        + f"; budget scale {cfg.budget_scale:g}.",
        "",
        "Command: `" + (cfg.command or "(library call)") + "`  ",
        f"Machine: {sessions[-1]['machine'] if sessions else '?'}; {cfg.workers} worker(s), "
        f"executor `{cfg.executor}`. Shared with other work while it ran, so wall times are noisy.  ",
        f"Wall time: {total_wall:.0f} s over {len(sessions)} session(s) "
        f"(this one {sessions[-1]['wall_time'] if sessions else 0:.0f} s).",
        "",
        "Scores are normalised test scores (0 = chance or the mean predictor, 1 = perfect; "
        "`rlhpo.observation.normalised_score`), one run per task x seed. IQM = interquartile "
        "mean over tasks x seeds with a 95% stratified bootstrap CI; P(> static) = probability "
        "that a run beats a static-default run on the same task (ties half), averaged over "
        "tasks; rank = mean rank among all entries within each task and seed (1 = best).",
        "",
        "## Summary",
        "",
    ]
    header = [
        "method",
        "start",
        "IQM [95% CI]",
        "P(> static) [95% CI]",
        "mean rank",
        "samples (runs)",
        "steps x static",
        "wall x static",
        "diverged",
        "runs",
    ]
    body = [
        [
            e.method,
            e.start,
            _ci(e.iqm),
            "—" if (e.method, e.start) == REFERENCE else _ci(e.poi, 2),
            f"{e.mean_rank:.2f}",
            f"{e.samples_ratio:.2f}",
            _x(e.steps_ratio),
            _x(e.compute_ratio),
            f"{e.diverged}/{e.n}",
            str(e.n),
        ]
        for e in e_all
    ]
    lines += [_table(header, body), ""]
    lines += [
        "## Per task: median test score over seeds",
        "",
        "Raw metric: " + ", ".join(f"`{t}` {report.metrics[t]}" for t in tasks) + ".",
        "",
    ]
    body = []
    for e in e_all:
        cells = []
        for t in tasks:
            v = [x for x in e.raw_by_task.get(t, []) if math.isfinite(x)]
            r = e.rank_by_task.get(t, math.nan)
            cells.append(f"{np.median(v):.3f} (rank {r:.1f})" if v else "—")
        body.append([e.method, e.start, *cells])
    lines += [_table(["method", "start", *tasks], body), ""]
    lines += [
        "## Seed-style table: intervals to target and best test score",
        "",
        "Target per task = the static default's final normalised validation score (median "
        "over seeds): "
        + ", ".join(f"`{t}` {report.targets[t]:.3f}" for t in tasks)
        + ". Intervals to target = training intervals (of one run's "
        "budget/intervals samples) spent until the validation score first reached it: for "
        "Optuna summed over its trials in order, for PBT counted for the whole population. "
        "Median over seeds (seeds that reached it / all); best = best test score over seeds.",
        "",
    ]
    body = []
    for e in e_all:
        cells = []
        for t in tasks:
            best = e.best_test.get(t, math.nan)
            cells.append(
                _target_cell(e.to_target.get(t))
                + (f" / {best:.3f}" if math.isfinite(best) else " / —")
            )
        body.append([e.method, e.start, *cells])
    lines += [_table(["method", "start", *[f"{t}: to target / best" for t in tasks]], body), ""]
    lines += [
        "## Cost",
        "",
        "Budget is counted in training samples: every single run gets one run's budget; "
        "Optuna's samples are the sum over its trials (pruned ones count what they consumed); "
        "PBT's budget is population x one run's samples (exploiting copies weights, no extra "
        "training). Ratios are medians over tasks x seeds against the static-default run of "
        "the same task and seed. PBT's wall time includes Ray's scheduling overhead, large on "
        "a small machine: its training time is shown separately.",
        "",
    ]
    body = [
        [
            e.method,
            e.start,
            f"{e.samples_ratio:.2f}",
            _x(e.steps_ratio),
            f"{e.wall_time:.2f}",
            _x(e.compute_ratio),
            _x(e.train_ratio),
        ]
        for e in e_all
    ]
    lines += [
        _table(
            [
                "method",
                "start",
                "samples (runs)",
                "optimizer steps x static",
                "wall time s (median)",
                "wall x static",
                "training time x static",
            ],
            body,
        ),
        "",
    ]
    notes = _method_notes(rows)
    if notes:
        lines += ["## Notes", "", *notes, ""]
    if report.plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in report.plots]
        lines.append("")
    lines += [
        "Files: `results.csv` (one row per cell), `traces.csv` (per-interval learning curves "
        "and hyperparameters), `trials.csv` (every Optuna trial and PBT member), "
        "`compare.json` (setup and sessions).",
        "",
    ]
    return "\n".join(lines)


def _method_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Each method's notes on its own rows, in the registry's order."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    notes = []
    for cls in registered():
        notes += cls.notes(by_kind.get(cls.kind, []))
    return notes


def summary_table(report: Report) -> tuple[list[str], list[list[Any]]]:
    """The summary as plain columns and rows (numbers, not text), e.g. for a W&B Table.
    ``norm_*`` columns are normalised test scores (chance 0, best 1); ``raw_*`` are
    the tasks' own metric (accuracy or R^2)."""
    cols = ["method", "start", "norm_test_iqm", "norm_test_iqm_lo", "norm_test_iqm_hi"]
    cols += ["p_improve_over_static", "mean_rank", "samples_ratio", "compute_ratio"]
    cols += [f"raw_test_median/{task}" for task in report.tasks]
    rows = []
    for e in report.entries:
        med = []
        for task in report.tasks:
            v = [x for x in e.raw_by_task.get(task, []) if math.isfinite(x)]
            med.append(float(np.median(v)) if v else None)
        poi = None if (e.method, e.start) == REFERENCE else e.poi[0]
        rows.append(
            [e.method, e.start, *e.iqm, poi, e.mean_rank, e.samples_ratio, e.compute_ratio, *med]
        )
    return cols, rows


def console_table(report: Report, title: str = "comparison"):
    """The summary as a rich table for the terminal."""
    from rich.table import Table

    metrics = sorted(set(report.metrics.values())) or ["score"]
    t = Table(
        title=title,
        caption=(
            "IQM and P(> static): normalised test score (chance = 0, perfect = 1); "
            f"task columns: raw test {'/'.join(metrics)}, median over seeds"
        ),
    )
    for col in ("method", "start", "IQM norm [95% CI]", "P(> static)", "rank", "samples", "wall x"):
        t.add_column(col, justify="left" if col in ("method", "start") else "right")
    for col in report.tasks:
        t.add_column(f"{col} raw (median)", justify="right")
    for e in report.entries:
        med = []
        for task in report.tasks:
            v = [x for x in e.raw_by_task.get(task, []) if math.isfinite(x)]
            med.append(f"{np.median(v):.3f}" if v else "—")
        t.add_row(
            e.method,
            e.start,
            _ci(e.iqm, 2),
            "—" if (e.method, e.start) == REFERENCE else _ci(e.poi, 2),
            f"{e.mean_rank:.2f}",
            f"{e.samples_ratio:.2f}",
            _x(e.compute_ratio),
            *med,
        )
    return t


def write_report(
    cfg: Any,
    specs: list[TaskSpec],
    methods: list[Method],
    raw_rows: list[dict[str, str]],
    meta: dict[str, Any],
    plots: bool = True,
) -> Report:
    """Compute the statistics and write summary.md and the PNGs into ``cfg.out``."""
    out = Path(cfg.out)
    rows = [typed(r) for r in raw_rows]
    keys = {(r["method"], r["task"], r["seed"], r["start"]) for r in rows}
    traces = [
        r
        for r in read_csv(out / "traces.csv")
        if (r["method"], r["task"], r["seed"], r["start"]) in keys
    ]
    trials = [
        r
        for r in read_csv(out / "trials.csv")
        if (r["method"], r["task"], r["seed"], ANY_START) in keys
    ]
    entries, targets = build_entries(
        rows, traces, trials, specs, methods, cfg.starts, reps=cfg.bootstrap_reps
    )
    metrics = {s.name: s.metric for s in specs}
    report = Report(entries, [s.name for s in specs], metrics, targets, None, [])
    if not rows:
        return report
    if plots:
        from rlhpo.compare.plots import write_plots

        report.plots = write_plots(out, report, rows, traces, trials, specs, cfg.starts)
    path = out / "summary.md"
    path.write_text(summary_markdown(report, cfg, meta, rows))
    report.summary_path = path
    return report
