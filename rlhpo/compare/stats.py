"""Aggregate statistics for comparisons, after Agarwal et al. (2021), "Deep RL at the
Edge of the Statistical Precipice" (the estimators of the ``rliable`` package):

- **IQM**: the interquartile mean of the normalised scores of all runs (tasks x
  seeds), ``scipy.stats.trim_mean(x, 0.25)``: robust to outlier runs, less noisy
  than the median;
- **95% stratified bootstrap CIs**: runs are resampled with replacement *within
  each task* (``scipy.stats.bootstrap`` with one sample per task, percentile
  intervals), so every resample keeps the task mix;
- **probability of improvement** ``P(X > Y)``: for each task the chance that a run
  of X scores above a run of Y (ties count half; the Mann-Whitney U statistic over
  ``n * m``), averaged over tasks, with a stratified bootstrap CI.

rliable itself (1.2.0) is not used because it no longer imports with pandas 3
(through its ``arch`` dependency); these are the same estimators on scipy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

Groups = Sequence[Sequence[float]]


def iqm(x: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50% of the values."""
    a = np.asarray(x, dtype=float)
    if a.size == 0:
        return float("nan")
    return float(stats.trim_mean(a, 0.25))


def _iqm_stat(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    return stats.trim_mean(np.concatenate(samples, axis=axis), 0.25, axis=axis)


def _bootstrap(
    data: list[np.ndarray],
    statistic: Callable[..., np.ndarray],
    point: float,
    reps: int,
    confidence: float,
    seed: int,
) -> tuple[float, float, float]:
    if any(d.size < 2 for d in data):
        return point, float("nan"), float("nan")  # one run per task: no interval
    if all(np.all(d == d[0]) for d in data):
        return point, point, point  # nothing varies: the interval is the point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples of tiny strata
        res = stats.bootstrap(
            tuple(data),
            statistic,
            n_resamples=reps,
            confidence_level=confidence,
            method="percentile",
            vectorized=True,
            rng=np.random.default_rng(seed),
        )
    return point, float(res.confidence_interval.low), float(res.confidence_interval.high)


def iqm_ci(
    by_task: Groups, reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """IQM over all runs and its stratified bootstrap CI: ``(iqm, low, high)``.

    ``by_task`` holds one sequence of run scores per task.
    """
    data = [np.asarray(g, dtype=float) for g in by_task if len(g)]
    if not data:
        return float("nan"), float("nan"), float("nan")
    point = iqm(np.concatenate(data))
    return _bootstrap(data, _iqm_stat, point, reps, confidence, seed)


def _p_greater(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # x: (..., n), y: (..., m) -> P(x > y) + 0.5 P(x == y) over all pairs
    gt = (x[..., :, None] > y[..., None, :]).mean(axis=(-1, -2))
    eq = (x[..., :, None] == y[..., None, :]).mean(axis=(-1, -2))
    return gt + 0.5 * eq


def probability_of_improvement(x_by_task: Groups, y_by_task: Groups) -> float:
    """``P(X > Y)`` averaged over tasks (both lists in the same task order)."""
    if len(x_by_task) != len(y_by_task):
        raise ValueError(
            f"x and y must hold the same tasks, got {len(x_by_task)} and {len(y_by_task)}"
        )
    vals = [
        float(_p_greater(np.asarray(x, float), np.asarray(y, float)))
        for x, y in zip(x_by_task, y_by_task, strict=True)
        if len(x) and len(y)
    ]
    return float(np.mean(vals)) if vals else float("nan")


def poi_ci(
    x_by_task: Groups,
    y_by_task: Groups,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Probability of improvement and its stratified (independent x, y) bootstrap CI."""
    pairs = [
        (np.asarray(x, float), np.asarray(y, float))
        for x, y in zip(x_by_task, y_by_task, strict=True)
        if len(x) and len(y)
    ]
    if not pairs:
        return float("nan"), float("nan"), float("nan")
    point = probability_of_improvement([p[0] for p in pairs], [p[1] for p in pairs])
    data = [a for p in pairs for a in p]

    def stat(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        s = [np.moveaxis(a, axis, -1) for a in samples]
        return np.mean([_p_greater(s[i], s[i + 1]) for i in range(0, len(s), 2)], axis=0)

    return _bootstrap(data, stat, point, reps, confidence, seed)


def mean_ci(
    values: Sequence[float], reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and its percentile bootstrap CI (per-task bars)."""
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return float("nan"), float("nan"), float("nan")
    return _bootstrap(
        [a], lambda s, axis=-1: np.mean(s, axis=axis), float(a.mean()), reps, confidence, seed
    )


def mean_ranks(
    scores: dict[str, dict[tuple[str, int], float]],
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Rank entries within each (task, seed) by score (1 = best, ties averaged).

    Returns the mean rank of each entry over all (task, seed) pairs it ran on, and
    its mean rank per task.
    """
    cells = sorted({c for by in scores.values() for c in by})
    per_task: dict[str, dict[str, list[float]]] = {e: {} for e in scores}
    for c in cells:
        entries = [e for e in scores if c in scores[e] and np.isfinite(scores[e][c])]
        if not entries:
            continue
        ranks = stats.rankdata([-scores[e][c] for e in entries], method="average")
        for e, r in zip(entries, ranks, strict=True):
            per_task[e].setdefault(c[0], []).append(float(r))
    overall = {
        e: float(np.mean([r for rs in t.values() for r in rs])) if t else float("nan")
        for e, t in per_task.items()
    }
    by_task = {e: {k: float(np.mean(v)) for k, v in t.items()} for e, t in per_task.items()}
    return overall, by_task
