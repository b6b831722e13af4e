"""Run methods x tasks x seeds (x starts) at equal sample budget, resumably, in
parallel worker processes or as Ray tasks, and write the comparison's files.

Every finished cell is appended to ``results.csv`` (flushed per row) after its
trace and trial rows, so the results row marks a cell as done: a rerun with the
same ``--out`` skips finished cells, drops the partial rows of cells that were in
flight, and carries on. Optuna studies resume inside a cell too (their trials are
in the study's storage).

The static run from the default start is every cell's cost reference (compute
ratio = wall time / its wall time on the same task and seed), so those cells run
first and are added when ``static`` is not among the methods.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import shlex
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhpo.compare.methods import (
    ANY_START,
    Cell,
    CellOutput,
    Method,
    MethodError,
    execute_cell,
    parse_method,
    resolve,
)
from rlhpo.run_folder import RunFolderLock, make_run_folder
from rlhpo.tasks.spec import TaskSpec, load_suite

RESULT_COLUMNS = [
    "method",
    "kind",
    "start",
    "task",
    "seed",
    "val_score",
    "test_score",
    "norm_val_score",
    "norm_test_score",
    "samples",
    "budget_samples",
    "samples_ratio",
    "optimizer_steps",
    "steps_ratio",
    "wall_time",
    "train_time",
    "compute_ratio",
    "runs",
    "pruned",
    "diverged",
    "final_lr",
    "final_batch_size",
    "final_dropout",
    "detail",
    "finished_at",
]
TRACE_COLUMNS = [
    "method",
    "start",
    "task",
    "seed",
    "trial",
    "interval",
    "samples",
    "optimizer_steps",
    "wall_time",
    "val_score",
    "norm_val_score",
    "val_loss",
    "train_loss",
    "lr",
    "batch_size",
    "dropout",
    "diverged",
]
TRIAL_COLUMNS = [
    "method",
    "task",
    "seed",
    "trial",
    "state",
    "lr",
    "batch_size",
    "dropout",
    "val_score",
    "norm_val_score",
    "test_score",
    "norm_test_score",
    "samples",
    "optimizer_steps",
    "wall_time",
    "intervals",
    "diverged",
    "val_trace",
]
REFERENCE = parse_method("static")
# Fewer resamples give confidence intervals that move from run to run.
MIN_BOOTSTRAP_REPS = 100


class CompareError(ValueError):
    """A comparison cannot start: bad arguments, or an output folder of another setup."""


@dataclass
class CompareConfig:
    """Everything ``rlhpo compare`` was asked to do."""

    out: Path
    methods: list[Method]
    suite: str = "default"
    split: str = "test"
    tasks: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: list(range(5)))
    starts: list[str] = field(default_factory=lambda: ["default", "low-lr"])
    budget_scale: float = 1.0
    workers: int = 2
    executor: str = "local"
    address: str | None = None
    storage: str | None = None
    use_wandb: bool = True
    bootstrap_reps: int = 2000
    command: str = ""
    plots: bool = True


@dataclass
class CompareResult:
    out: Path
    ran: int
    skipped: int
    failed: list[tuple[str, str]]
    wall_time: float
    summary: Path | None
    plots: list[Path]
    report: Any = None


# ----------------------------------------------------------------------------
# Append-only CSV files that survive a kill


class CsvLog:
    """A CSV file appended row by row (flushed and synced), read back tolerantly."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns

    def read(self) -> tuple[list[dict[str, str]], bool]:
        """Rows, and whether the file needs rewriting (a torn last line was dropped)."""
        if not self.path.exists():
            return [], False
        text = self.path.read_text()
        torn = bool(text) and not text.endswith("\n")
        if torn:  # killed mid-write: the last line is incomplete
            text = text[: text.rfind("\n") + 1]
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            return [], torn
        if header != self.columns:
            raise CompareError(
                f"{self.path} has columns {header}, expected {self.columns}: it was written "
                f"by another rlhpo version; use another --out"
            )
        rows = [dict(zip(self.columns, r, strict=True)) for r in reader if len(r) == len(header)]
        return rows, torn

    def rewrite(self, rows: Iterable[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns)
            w.writeheader()
            w.writerows(_fmt(r) for r in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(_fmt(r) for r in rows)
            f.flush()
            os.fsync(f.fileno())


def _fmt(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, float):
            out[k] = "" if v != v else repr(v)  # NaN -> empty
        elif v is None:
            out[k] = ""
        else:
            out[k] = v
    return out


def row_key(row: dict[str, Any]) -> tuple[str, str, int, str]:
    """The cell a CSV row belongs to: (method, task, seed, start)."""
    return (
        str(row["method"]),
        str(row["task"]),
        int(row["seed"]),
        str(row.get("start", ANY_START)),
    )


# ----------------------------------------------------------------------------
# Executors: run cells somewhere, hand back finished ones


class _Inline:
    """Runs cells one after another in this process (``--workers 1``)."""

    def __init__(self) -> None:
        self.queue: deque[Cell] = deque()

    @property
    def busy(self) -> int:
        return len(self.queue)

    def submit(self, cell: Cell) -> None:
        self.queue.append(cell)

    def wait(self):
        cell = self.queue.popleft()
        try:
            return [(cell, execute_cell(cell), None)]
        except Exception as e:  # noqa: BLE001 - reported per cell, the rest goes on
            return [(cell, None, e)]

    def close(self, cancel: bool = False) -> None:
        self.queue.clear()


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    from rlhpo.runtime import limit_threads

    limit_threads()


class _Pool:
    """Worker processes (spawned, one torch thread each)."""

    def __init__(self, workers: int) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker
        )
        self.futures: dict[Any, Cell] = {}

    @property
    def busy(self) -> int:
        return len(self.futures)

    def submit(self, cell: Cell) -> None:
        self.futures[self.pool.submit(execute_cell, cell)] = cell

    def wait(self):
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
        out = []
        for f in done:
            cell = self.futures.pop(f)
            err = f.exception()
            out.append((cell, None if err else f.result(), err))
        return out

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


class _Ray:
    """Cells as Ray tasks, on a local instance or a cluster (``--address``)."""

    def __init__(self, workers: int, address: str | None) -> None:
        from rlhpo.baselines.pbt import ensure_ray
        from rlhpo.runtime import RAY_WORKER_ENV, ray_unreachable_message

        try:
            self.started = ensure_ray(num_cpus=workers, address=address)
        except ConnectionError as e:
            raise CompareError(ray_unreachable_message(address, e)) from None
        import ray

        self.ray = ray
        self.remote = ray.remote(num_cpus=1, max_retries=0)(execute_cell).options(
            runtime_env={"env_vars": dict(RAY_WORKER_ENV)}
        )
        self.refs: dict[Any, Cell] = {}

    @property
    def busy(self) -> int:
        return len(self.refs)

    def submit(self, cell: Cell) -> None:
        self.refs[self.remote.remote(cell)] = cell

    def wait(self):
        ready, _ = self.ray.wait(list(self.refs), num_returns=1)
        out = []
        for ref in ready:
            cell = self.refs.pop(ref)
            try:
                out.append((cell, self.ray.get(ref), None))
            except Exception as e:  # noqa: BLE001
                out.append((cell, None, e))
        return out

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self.refs:
                self.ray.cancel(ref, force=True)
        self.refs.clear()
        if self.started:
            self.ray.shutdown()


# ----------------------------------------------------------------------------


def _machine() -> str:
    import torch

    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__} (1 thread per worker), no GPU"
    )


def _prepare(cfg: CompareConfig) -> tuple[Any, list[TaskSpec], list[Method]]:
    if cfg.executor not in ("local", "ray"):
        raise CompareError(f"--executor must be local or ray, got {cfg.executor!r}")
    if cfg.workers < 1:
        raise CompareError(f"--workers must be >= 1, got {cfg.workers!r}")
    if not cfg.seeds:
        raise CompareError("--seeds must give at least one seed")
    if not cfg.budget_scale > 0:
        raise CompareError(f"--budget-scale must be > 0, got {cfg.budget_scale!r}")
    if cfg.bootstrap_reps < MIN_BOOTSTRAP_REPS:
        raise CompareError(
            f"--bootstrap-reps must be >= {MIN_BOOTSTRAP_REPS}, got {cfg.bootstrap_reps!r}"
        )
    suite = load_suite(cfg.suite)
    specs = suite.split(cfg.split)
    if cfg.tasks:
        for t in cfg.tasks:
            if t not in [s.name for s in specs]:
                raise CompareError(
                    f"task {t!r} is not in split {cfg.split!r} of suite {suite.name!r}: "
                    f"{', '.join(s.name for s in specs)}"
                )
        specs = [s for s in specs if s.name in cfg.tasks]
    if not specs:
        raise CompareError(f"split {cfg.split!r} of suite {suite.name!r} holds no tasks")
    if cfg.budget_scale != 1.0:
        specs = [s.scaled(cfg.budget_scale) for s in specs]
    methods = [resolve(m, suite.name, specs) for m in cfg.methods]
    if cfg.storage:
        from rlhpo.baselines.optuna_study import StorageError, prepare_storage

        try:  # before any cell: a bad URL, driver or server is one line, not N failed cells
            prepare_storage(cfg.storage)
        except StorageError as e:
            raise CompareError(str(e)) from None
    return suite, specs, methods


def _check_folder(cfg: CompareConfig, suite, specs: list[TaskSpec], methods) -> dict[str, Any]:
    """Read or create OUT/compare.json; refuse a folder holding another setup."""
    path = cfg.out / "compare.json"
    now = {
        "suite": suite.name,
        "split": cfg.split,
        "budget_scale": cfg.budget_scale,
        "tasks": {
            s.name: {"budget_samples": s.budget_samples, "intervals": s.intervals} for s in specs
        },
        "methods": {m.label: m.raw for m in methods},
        # The key's name predates other fingerprints: policies' weights are the only ones.
        "policy_sha256": _fingerprints(methods),
    }
    if not path.exists():
        return {**now, "comparison_id": _new_comparison_id(cfg, now), "sessions": []}
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompareError(f"{path}: unreadable ({e}); use another --out") from None
    if not isinstance(old, dict):
        raise CompareError(f"{path}: not a comparison record; use another --out")
    # Folders written before comparison ids keep their studies' old names.
    old.setdefault("comparison_id", cfg.out.resolve().name)
    for key in ("suite", "split", "budget_scale"):
        if old.get(key) != now[key]:
            raise CompareError(
                f"{cfg.out} holds a comparison with {key} {old.get(key)!r}; this run asks for "
                f"{now[key]!r}: use another --out"
            )
    for t, info in now["tasks"].items():
        if t in old.get("tasks", {}) and old["tasks"][t] != info:
            raise CompareError(
                f"{cfg.out}: task {t!r} had {old['tasks'][t]} there, now {info}: use another --out"
            )
    for m in methods:
        label, raw = m.label, m.raw
        prev = old.get("methods", {}).get(label)
        if prev is not None and not _same_setup(prev, m):
            raise CompareError(
                f"{cfg.out}: method name {label!r} meant {prev!r} there, now {raw!r}: "
                f"rename it with ?name=... or use another --out"
            )
    for label, digest in now["policy_sha256"].items():
        prev = old.get("policy_sha256", {}).get(label)
        if prev is not None and prev != digest:
            raise CompareError(
                f"{cfg.out}: the policy of method {label!r} ({now['methods'][label]}) changed "
                f"since its cells ran (weights sha256 {prev[:12]}... now {digest[:12]}...): "
                "rename it with ?name=... or use another --out"
            )
    old["tasks"] = {**old.get("tasks", {}), **now["tasks"]}
    old["methods"] = {**old.get("methods", {}), **now["methods"]}
    old["policy_sha256"] = {**old.get("policy_sha256", {}), **now["policy_sha256"]}
    return old


def _fingerprints(methods: list[Method]) -> dict[str, str]:
    out = {}
    for m in methods:
        digest = m.fingerprint()
        if digest is not None:
            out[m.label] = digest
    return out


def _new_comparison_id(cfg: CompareConfig, setup: dict[str, Any]) -> str:
    """The name of a new comparison's Optuna studies and W&B group: the folder's name
    for people, a digest of the setup (and a nonce, so that two separate comparisons of
    one setup sharing a storage stay apart) for uniqueness. Stored in compare.json, so a
    moved or renamed folder keeps it."""
    import hashlib
    import uuid

    text = json.dumps(
        {**setup, "seeds": cfg.seeds, "starts": cfg.starts, "nonce": uuid.uuid4().hex},
        sort_keys=True,
    )
    return f"{cfg.out.resolve().name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _same_setup(prev_raw: str, method: Method) -> bool:
    """Whether a label's method string from an earlier session means what ``method``
    means now (the same method spelt differently, e.g. a policy that moved, still is)."""
    if prev_raw == method.raw:
        return True
    try:
        prev = parse_method(prev_raw)
    except MethodError:
        return False
    return type(prev) is type(method) and prev.setup() == method.setup()


def plan_cells(
    cfg: CompareConfig,
    suite,
    specs: list[TaskSpec],
    methods: list[Method],
    comparison: str | None = None,
) -> list[Cell]:
    """All cells of the comparison, cost-reference cells (static, default start) first.
    ``comparison``: the id recorded in compare.json (default: the folder's name)."""
    comparison = comparison or cfg.out.resolve().name
    common = dict(
        out=str(cfg.out),
        comparison=comparison,
        suite_name=suite.name,
        split=cfg.split,
        storage=cfg.storage,
        use_wandb=cfg.use_wandb,
        num_cpus=cfg.workers,
        address=cfg.address,
    )
    ref_method = next((m for m in methods if m.label == "static"), REFERENCE)
    if ref_method.raw != "static":
        raise CompareError(
            f"the name 'static' is reserved for the cost reference; method {ref_method.raw!r} "
            f"uses it: give it another ?name="
        )
    cells = [
        Cell(ref_method, s, seed, "default", is_reference=True, **common)
        for s in specs
        for seed in cfg.seeds
    ]
    seen = {c.key for c in cells}
    for m in methods:
        starts = [ANY_START] if m.start_independent else cfg.starts
        for s in specs:
            for seed in cfg.seeds:
                for st in starts:
                    c = Cell(m, s, seed, st, **common)
                    if c.key not in seen:
                        seen.add(c.key)
                        cells.append(c)
    return cells


def _load_done(out: Path) -> dict[tuple, dict[str, str]]:
    """Finished cells from results.csv; repairs the three CSV files after a kill."""
    results = CsvLog(out / "results.csv", RESULT_COLUMNS)
    rows, torn = results.read()
    done: dict[tuple, dict[str, str]] = {}
    for r in rows:
        done.setdefault(_checked_key(results.path, r, row_key), r)
    if torn or len(done) != len(rows):
        results.rewrite(done.values())
    for name, cols, keyf, rowf in (
        ("traces.csv", TRACE_COLUMNS, row_key, lambda r: (*row_key(r), r["trial"], r["interval"])),
        ("trials.csv", TRIAL_COLUMNS, _trial_cell, lambda r: (*_trial_cell(r), r["trial"])),
    ):
        log = CsvLog(out / name, cols)
        part, torn = log.read()
        # Only rows of finished cells (a cell in flight when the run stopped left some),
        # and each row once (a cell run twice, e.g. by two processes before locking, has
        # two copies: keep the first, as results.csv does).
        kept: dict[tuple, dict[str, str]] = {}
        for r in part:
            if _checked_key(log.path, r, keyf) in done:
                kept.setdefault(rowf(r), r)
        if torn or len(kept) != len(part):
            log.rewrite(kept.values())
    return done


def _trial_cell(r: dict[str, str]) -> tuple[str, str, int, str]:
    return (r["method"], r["task"], int(r["seed"]), ANY_START)


def _checked_key(path: Path, row: dict[str, str], keyf) -> tuple:
    try:
        return keyf(row)
    except ValueError:
        raise CompareError(
            f"{path}: a row has seed {row.get('seed')!r}, not an integer; fix or remove "
            "that row, or use another --out"
        ) from None


def run_comparison(cfg: CompareConfig, console=None, show_progress: bool = True) -> CompareResult:
    """Run (or continue) a comparison and write results, traces, summary and plots.

    Holds ``cfg.out`` for the whole run: a second process on the same folder gets a
    :class:`~rlhpo.run_folder.RunFolderBusy` error instead of interleaving its rows."""
    t_start = time.perf_counter()
    prepared = _prepare(cfg)
    make_run_folder(cfg.out)
    with RunFolderLock(cfg.out, cfg.command):
        return _run_held(cfg, prepared, t_start, console, show_progress)


def _run_held(cfg: CompareConfig, prepared, t_start: float, console, show_progress: bool):
    from rich.console import Console

    console = console or Console()
    suite, specs, methods = prepared
    ignore = cfg.out / ".gitignore"
    if not ignore.exists():  # committing a results folder leaves out logs and studies
        ignore.write_text("runs/\nstudies/\n*.tmp\n.rlhpo.lock*\n")
    meta = _check_folder(cfg, suite, specs, methods)
    cells = plan_cells(cfg, suite, specs, methods, comparison=meta["comparison_id"])
    done = _load_done(cfg.out)
    (cfg.out / "compare.json").write_text(json.dumps(meta, indent=2) + "\n")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # spawned workers inherit it

    logs = {
        "results": CsvLog(cfg.out / "results.csv", RESULT_COLUMNS),
        "traces": CsvLog(cfg.out / "traces.csv", TRACE_COLUMNS),
        "trials": CsvLog(cfg.out / "trials.csv", TRIAL_COLUMNS),
    }
    refs: dict[tuple[str, int], dict[str, float]] = {}
    for k, r in done.items():
        if k[0] == "static" and k[3] == "default":
            refs[(k[1], k[2])] = _cost(r)
    todo = [c for c in cells if c.key not in done]
    skipped = len(cells) - len(todo)
    is_ref = {c.key for c in cells if c.is_reference}
    waiting: dict[tuple[str, int], list[Cell]] = {}
    in_driver: list[Cell] = []
    ready: list[Cell] = []
    for c in todo:
        if c.key in is_ref:
            ready.append(c)
        elif (c.spec.name, c.seed) in refs:
            c.reference = refs[(c.spec.name, c.seed)]
            (in_driver if c.method.runs_in_driver else ready).append(c)
        else:
            waiting.setdefault((c.spec.name, c.seed), []).append(c)

    if cfg.executor == "ray":
        ex: Any = _Ray(cfg.workers, cfg.address)
    elif cfg.workers > 1 and len(todo) > 1:
        ex = _Pool(cfg.workers)
    else:
        ex = _Inline()
    failed: list[tuple[str, str]] = []
    ran = 0
    progress = _progress(console, show_progress)
    task_id = progress.add_task("cells", total=len(cells), completed=skipped) if progress else None
    if progress:
        progress.start()
        if skipped:
            progress.console.print(f"resuming: {skipped} of {len(cells)} cells already finished")

    def finish(cell: Cell, out: CellOutput | None, err: BaseException | None) -> None:
        nonlocal ran
        if err is not None:
            failed.append((cell.cell_id, f"{type(err).__name__}: {err}"))
            if progress:
                progress.console.print(f"[red]failed[/red] {cell.cell_id}: {err}")
        else:
            logs["trials"].append(out.trials)
            logs["traces"].append(out.trace)
            logs["results"].append([out.row])  # last: marks the cell as done
            ran += 1
        if cell.key in is_ref:
            refs[(cell.spec.name, cell.seed)] = _cost(out.row) if out else None
            for c in sorted(waiting.pop((cell.spec.name, cell.seed), []), key=_cost_guess):
                c.reference = refs[(cell.spec.name, cell.seed)]
                if c.method.runs_in_driver:
                    in_driver.append(c)
                else:
                    ex.submit(c)
        if progress:
            msg = f"{cell.method.label} | {cell.spec.name} | seed {cell.seed} | {cell.start}"
            if out is not None:
                msg += (
                    f" | test {_short(out.row['norm_test_score'])} | {out.row['wall_time']:.1f} s"
                )
            progress.update(task_id, advance=1, description=msg)
            if not progress.console.is_terminal:  # logs get one line per cell instead
                done_n = int(progress.tasks[0].completed)
                progress.console.print(f"[{done_n}/{len(cells)}] {msg}", highlight=False)

    try:
        for c in sorted(ready, key=lambda c: (not c.is_reference, _cost_guess(c))):
            ex.submit(c)
        while ex.busy:
            for cell, out, err in ex.wait():
                finish(cell, out, err)
        for c in waiting.values():  # only if a reference never ran
            in_driver.extend(c)
        # Methods that run in this process (PBT) go after the pool is idle: Ray spreads
        # PBT's members over the same cores the workers used.
        _run_in_driver(in_driver, cfg, finish)
    except KeyboardInterrupt:
        ex.close(cancel=True)
        if progress:
            progress.stop()
        console.print(
            f"[yellow]interrupted[/yellow]: {ran} cells finished in this run were saved; "
            f"run the same command again to continue"
        )
        raise
    finally:
        if progress:
            progress.stop()
    ex.close()

    wall = time.perf_counter() - t_start
    meta["sessions"].append(
        {
            "command": cfg.command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - wall)),
            "wall_time": round(wall, 1),
            "cells_run": ran,
            "cells_failed": len(failed),
            "machine": _machine(),
            "workers": cfg.workers,
            "executor": cfg.executor,
        }
    )
    (cfg.out / "compare.json").write_text(json.dumps(meta, indent=2) + "\n")

    from rlhpo.compare.report import write_report

    keys = {c.key for c in cells}
    rows = [r for r in logs["results"].read()[0] if row_key(r) in keys]
    report = write_report(cfg, specs, methods, rows, meta, plots=cfg.plots)
    if cfg.use_wandb and report.entries:
        _log_summary_run(cfg, report)
    return CompareResult(
        out=cfg.out,
        ran=ran,
        skipped=skipped,
        failed=failed,
        wall_time=wall,
        summary=report.summary_path,
        plots=report.plots,
        report=report,
    )


def _run_in_driver(cells: list[Cell], cfg: CompareConfig, finish) -> None:
    """Run ``cells`` in this process, each method's inside its ``driver_session``
    (one Ray instance for every PBT cell)."""
    by_type: dict[type[Method], list[Cell]] = {}
    for c in cells:
        by_type.setdefault(type(c.method), []).append(c)
    for cls, group in by_type.items():
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(cls.driver_session(cfg.workers, cfg.address))
            except Exception as e:  # noqa: BLE001 - e.g. Ray not installed: fail these cells
                for c in group:
                    finish(c, None, e)
                continue
            for c in group:
                try:
                    finish(c, execute_cell(c), None)
                except Exception as e:  # noqa: BLE001
                    finish(c, None, e)


def _log_summary_run(cfg: CompareConfig, report: Any) -> None:
    """One W&B run per comparison session, beside the cells' runs in their group: the
    summary as a W&B Table and the plots as W&B images."""
    from rlhpo.compare.report import summary_table
    from rlhpo.tracking import Tracker

    comparison = cfg.out.resolve().name
    with Tracker(
        cfg.out / "runs" / "summary",
        config={"comparison": comparison, "command": cfg.command, "suite": cfg.suite},
        group=comparison,
        name=f"{comparison}-summary",
        job_type="summary",
    ) as tr:
        columns, rows = summary_table(report)
        tr.log_table("summary", columns, rows)
        tr.log_images({f"plots/{p.stem}": p for p in report.plots})


def _cost_guess(cell: Cell) -> float:
    """Sort key: long cells first (an Optuna study started last would run alone at
    the end while the other workers idle)."""
    return -cell.method.cost_runs(cell.spec) * cell.spec.budget_samples


def _cost(row: dict[str, Any]) -> dict[str, float]:
    return {"wall_time": float(row["wall_time"]), "optimizer_steps": float(row["optimizer_steps"])}


def _short(v: Any) -> str:
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return "-"


def _progress(console, show: bool):
    if not show:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
        # Without a terminal the bar is not redrawn; finish() prints a line per cell.
        disable=not console.is_terminal,
    )


def command_line() -> str:
    """The command that started this process, shell-quoted (for the summary)."""
    args = [Path(sys.argv[0]).name, *sys.argv[1:]]
    return " ".join(shlex.quote(a) for a in args)


__all__ = [
    "CompareConfig",
    "CompareError",
    "CompareResult",
    "CsvLog",
    "MethodError",
    "plan_cells",
    "run_comparison",
]
