"""Headroom of each test task: Optuna-TPE-20 minus the static default, from a comparison.

    rlhpo compare --suite default --split test --methods static,optuna-tpe:20 \
        --seeds 5 --starts default --workers 2 --no-wandb --out runs/headroom
    python experiments/headroom.py runs/headroom/results.csv \
        --out experiments/results/headroom.md

Rule (issue 13): a task has headroom when the mean normalised test score of
``optuna-tpe:20`` exceeds the static default's by at least ``--min-gap`` (0.03).
A task without it plays "do no harm" when the static default is already within
``--ceiling`` (0.03) of the best score any run of it reached; otherwise it fails
the rule. At most a third of the tasks may play "do no harm".
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def headroom_rows(rows: list[dict[str, str]], optuna: str, min_gap: float, ceiling: float):
    """Per task: static mean, Optuna mean, gap, best single score, and the verdict."""
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["method"] == "static" and r["start"] != "default":
            continue
        scores[(r["task"], r["method"])].append(float(r["norm_test_score"]))
    tasks = sorted({t for t, _ in scores})
    out = []
    for t in tasks:
        static, opt = scores.get((t, "static")), scores.get((t, optuna))
        if not static or not opt:
            raise SystemExit(f"task {t!r} lacks 'static' (start default) or {optuna!r} rows")
        s, o = statistics.fmean(static), statistics.fmean(opt)
        best = max(static + opt)
        if o - s >= min_gap:
            verdict = "headroom"
        elif best - s <= ceiling:
            verdict = "do no harm"
        else:
            verdict = "FAILS"
        out.append((t, len(static), s, o, o - s, best, verdict))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="results.csv of a comparison")
    ap.add_argument("--optuna", default="optuna-tpe:20", help="label of the Optuna method")
    ap.add_argument("--min-gap", type=float, default=0.03)
    ap.add_argument("--ceiling", type=float, default=0.03)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if not a.results.is_file():
        sys.exit(f"error: {a.results} does not exist")
    with a.results.open() as f:
        rows = list(csv.DictReader(f))
    table = headroom_rows(rows, a.optuna, a.min_gap, a.ceiling)
    n_harm = sum(r[-1] == "do no harm" for r in table)
    n_fail = sum(r[-1] == "FAILS" for r in table)
    lines = [
        "# Headroom of the test tasks",
        "",
        f"From `{a.results}`; command: `python experiments/headroom.py {a.results}`.",
        f"Normalised test score, mean over seeds. Headroom: {a.optuna} - static >= "
        f'{a.min_gap}; "do no harm": static within {a.ceiling} of the best run.',
        "",
        f"| task | seeds | static | {a.optuna} | gap | best run | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for t, n, s, o, gap, best, v in table:
        lines.append(f"| {t} | {n} | {s:.3f} | {o:.3f} | {gap:+.3f} | {best:.3f} | {v} |")
    lines += [
        "",
        f"{len(table) - n_harm - n_fail} with headroom, {n_harm} do no harm "
        f"(at most {len(table) // 3} allowed), {n_fail} failing the rule.",
    ]
    text = "\n".join(lines) + "\n"
    if a.out:
        a.out.write_text(text)
    print(text)
    if n_fail or n_harm > len(table) // 3:
        sys.exit(1)


if __name__ == "__main__":
    main()
