"""The comparison's PNGs: score vs compute (Optuna's best-of-k curve against each
single-run method), per-task bars with CIs, and example learning curves with the
hyperparameter traces."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from rlhpo.compare import stats
from rlhpo.compare.methods import ANY_START
from rlhpo.tasks.spec import TaskSpec

_STYLES = {"default": "-", "low-lr": "--", "high-lr": ":", ANY_START: "-."}
_MARKERS = "osD^v<>PXh*p"


def _colors(methods: list[str]) -> dict[str, Any]:
    """Distinct colours: tab10, then Dark2 (tab20's light twins are hard to tell apart)."""
    import matplotlib

    palette = list(matplotlib.colormaps["tab10"].colors) + list(
        matplotlib.colormaps["Dark2"].colors
    )
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def write_plots(
    out: Path,
    report,
    rows: list[dict[str, Any]],
    traces: list[dict[str, Any]],
    trials: list[dict[str, Any]],
    specs: list[TaskSpec],
    starts: list[str],
) -> list[Path]:
    """Write every plot into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    methods = list(dict.fromkeys(e.method for e in report.entries))
    colors = _colors(methods)
    paths = [
        score_vs_compute(out / "score_vs_compute.png", report, rows, trials, colors),
        per_task_bars(out / "per_task.png", report, colors),
    ]
    for st in starts:
        p = learning_curves(
            out / f"learning_curves_{st}.png", report, rows, traces, specs, st, colors
        )
        if p is not None:
            paths.append(p)
    return paths


def best_of_k(
    rows: list[dict[str, Any]], trials: list[dict[str, Any]], method: str
) -> list[tuple[float, float, float, float, float]]:
    """Optuna's best-of-k curve for one method: for k = 1..N, the trial with the best
    validation score among the first k (in trial order) and its test score.

    Returns per k: (median samples in runs, median wall time x static, IQM of the
    normalised test score over tasks x seeds, CI low, CI high).
    """
    budget = {(r["task"], r["seed"]): r["budget_samples"] for r in rows if r["method"] == method}
    ref_wall = {
        (r["task"], r["seed"]): r["wall_time"]
        for r in rows
        if (r["method"], r["start"]) == ("static", "default")
    }
    studies: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for t in trials:
        if t["method"] == method and (t["task"], t["seed"]) in budget:
            studies.setdefault((t["task"], t["seed"]), []).append(t)
    if not studies:
        return []
    n = max(len(v) for v in studies.values())
    curve = []
    for k in range(1, n + 1):
        xs, ws, by_task = [], [], {}
        for (task, seed), ts in studies.items():
            first = sorted(ts, key=lambda t: t["trial"])[:k]
            done = [
                t for t in first if t["state"] == "COMPLETE" and math.isfinite(t["norm_val_score"])
            ]
            if not done:
                continue
            best = max(done, key=lambda t: (t["norm_val_score"], -t["trial"]))
            test = best["norm_test_score"]
            by_task.setdefault(task, []).append(test if math.isfinite(test) else 0.0)
            xs.append(sum(t["samples"] or 0 for t in first) / budget[(task, seed)])
            wall = sum(t["wall_time"] for t in first if math.isfinite(t["wall_time"]))
            if ref_wall.get((task, seed)):
                ws.append(wall / ref_wall[(task, seed)])
        if not xs:
            continue
        p, lo, hi = stats.iqm_ci(list(by_task.values()), reps=500)
        curve.append((float(np.median(xs)), float(np.median(ws)) if ws else math.nan, p, lo, hi))
    return curve


def score_vs_compute(path: Path, report, rows, trials, colors) -> Path:
    import matplotlib
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    for ax, xi, xlabel in (
        (axes[0], 0, "training samples (multiples of one run's budget)"),
        (axes[1], 1, "wall time (x the static-default run)"),
    ):
        for e in report.entries:
            if not e.method_type.best_of_k:
                continue
            c = best_of_k(rows, trials, e.method)
            if not c:
                continue
            x = [r[xi] for r in c]
            y = [r[2] for r in c]
            ax.plot(x, y, "-", color=colors[e.method], alpha=0.8, lw=1.5)
            ax.fill_between(
                x, [r[3] for r in c], [r[4] for r in c], color=colors[e.method], alpha=0.12
            )
            for k in sorted({1, 5, 10, 20, 50, len(c)}):
                if k <= len(c):
                    ax.annotate(
                        f"k={k}",
                        (x[k - 1], y[k - 1]),
                        fontsize=7,
                        color=colors[e.method],
                        xytext=(3, -10),
                        textcoords="offset points",
                    )
        singles = [e for e in report.entries if not e.method_type.searcher]
        for i, e in enumerate(report.entries):
            x = e.samples_ratio if xi == 0 else e.compute_ratio
            p, lo, hi = e.iqm
            if not (math.isfinite(x) and math.isfinite(p)):
                continue
            if xi == 0 and e in singles:  # all single runs sit at 1 run: spread them a little
                x *= 1.0 + 0.25 * (singles.index(e) / max(len(singles) - 1, 1) - 0.5)
            err = None
            if math.isfinite(lo) and math.isfinite(hi):
                err = [[max(p - lo, 0)], [max(hi - p, 0)]]
            ax.errorbar(
                [x],
                [p],
                yerr=err,
                fmt=_MARKERS[i % len(_MARKERS)],
                color=colors[e.method],
                mfc="white" if e.start not in ("default", ANY_START) else colors[e.method],
                ms=7,
                capsize=3,
                label=e.name if xi == 1 else None,
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(
            matplotlib.ticker.FixedLocator([1, 2, 3, 5, 10, 20, 50, 100, 200])
        )
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("normalised test score, IQM over tasks x seeds (95% CI)")
    axes[0].text(
        0.01,
        0.01,
        "single runs spread around 1 run for legibility",
        transform=axes[0].transAxes,
        fontsize=7,
        color="gray",
    )
    fig.suptitle("Score vs compute: single runs (points) and Optuna best-of-k (lines, k = trials)")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def per_task_bars(path: Path, report, colors) -> Path:
    import matplotlib.pyplot as plt

    tasks = report.tasks
    ncol = min(len(tasks), 2)
    nrow = math.ceil(len(tasks) / ncol)
    n = len(report.entries)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(7 * ncol, 0.32 * n * nrow + 1.5 * nrow), squeeze=False
    )
    for ax, task in zip(axes.flat, tasks, strict=False):
        ys, means, errs, cols = [], [], [], []
        for i, e in enumerate(report.entries):
            m, lo, hi = stats.mean_ci(e.raw_by_task.get(task, []), reps=1000)
            ys.append(i)
            means.append(m if math.isfinite(m) else 0.0)
            errs.append(
                [max(m - lo, 0), max(hi - m, 0)]
                if math.isfinite(lo) and math.isfinite(hi)
                else [0.0, 0.0]
            )
            cols.append(colors[e.method])
        ax.barh(ys, means, xerr=np.array(errs).T, color=cols, alpha=0.85, capsize=2)
        ax.set_yticks(ys, [e.name for e in report.entries], fontsize=7)
        ax.invert_yaxis()
        lows = [m - e[0] for m, e in zip(means, errs, strict=True)]
        highs = [m + e[1] for m, e in zip(means, errs, strict=True)]
        lo, hi = min(lows), max(highs)
        pad = 0.05 * max(hi - lo, 1e-3)
        # Scores near the top are what differ: start the axis near the lowest bar
        # unless some are negative (R^2 below the mean predictor).
        ax.set_xlim(lo - pad if lo < 0 else max(0.0, lo - 4 * pad), hi + pad)
        ax.axvline(0.0, color="black", lw=0.6)
        ax.set_title(f"{task} ({report.metrics[task]})", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.set_visible(False)
    fig.suptitle("Test score per task: mean over seeds, 95% bootstrap CI")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def learning_curves(path: Path, report, rows, traces, specs, start, colors) -> Path | None:
    """Validation score and hyperparameters per interval, first seed, one column per
    task, for the entries from ``start`` (and the start-independent ones)."""
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in rows})
    if not seeds:
        return None
    seed = seeds[0]
    entries = [e for e in report.entries if e.start in (start, ANY_START)]
    if not entries:
        return None
    tasks = report.tasks[:4]
    fig, axes = plt.subplots(
        4, len(tasks), figsize=(4.2 * len(tasks), 10), squeeze=False, sharex="col"
    )
    for j, task in enumerate(tasks):
        for e in entries:
            pts = sorted(
                (
                    r
                    for r in traces
                    if r["method"] == e.method
                    and r["start"] == e.start
                    and r["task"] == task
                    and r["seed"] == seed
                ),
                key=lambda r: r["interval"],
            )
            if not pts:
                continue
            x = [r["interval"] for r in pts]
            style = dict(color=colors[e.method], ls=_STYLES.get(e.start, "-"), lw=1.4, alpha=0.9)
            axes[0, j].plot(x, [r["norm_val_score"] for r in pts], label=e.name, **style)
            axes[1, j].plot(x, [r["lr"] for r in pts], **style)
            axes[2, j].plot(x, [r["batch_size"] for r in pts], **style)
            axes[3, j].plot(x, [r["dropout"] for r in pts], **style)
        axes[0, j].set_title(task, fontsize=10)
        axes[1, j].set_yscale("log")
        axes[2, j].set_yscale("log", base=2)
        axes[3, j].set_xlabel("interval")
    for i, lab in enumerate(("normalised val score", "learning rate", "batch size", "dropout")):
        axes[i, 0].set_ylabel(lab)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes[0, 1:]:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab, strict=True):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    fig.suptitle(
        f"Learning curves, seed {seed}, start {start!r} (Optuna: its chosen trial; PBT: best member)"
    )
    fig.tight_layout()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(4, len(labels)),
        fontsize=8,
        frameon=False,
    )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
