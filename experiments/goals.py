"""Mark the policy goals of issue #15 met or not, from a committed comparison.

    python experiments/goals.py experiments/results/compare-v2-policy --policy policy:default

Reads ``results.csv`` of an ``rlhpo compare`` folder and writes ``goals.md`` beside it:

- quality: the policy's IQM (default start) against the tuned warm-up + cosine,
  Schedule-Free, Prodigy and Optuna-TPE-20, and whether its CI lies above static's;
- no harm: on every task, policy median >= static median - 0.01 (default start);
- bad start: from lr 1e-5, the share of the static(lr 1e-5) -> Optuna gap the policy
  closes, per task (goal: >= 90% on every task; tasks whose gap is under 0.02 are
  counted as met when the policy is within 0.02 of Optuna);
- cost: median optimizer steps and wall time relative to static (goals: <= 1.0x and
  <= 1.25x).
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import numpy as np

from rlhpo.compare.stats import iqm_ci


def _rows(folder: Path) -> list[dict]:
    with (folder / "results.csv").open() as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--policy", default="policy:default")
    ap.add_argument("--optuna", default="optuna-tpe:20")
    a = ap.parse_args(argv)
    folder = Path(a.folder)
    rows = _rows(folder)
    tasks = sorted({r["task"] for r in rows})

    def sel(method: str, start: str | None = None) -> list[dict]:
        return [
            r
            for r in rows
            if r["method"] == method and (start is None or r["start"] in (start, "any"))
        ]

    def scores(method: str, start: str | None = None, task: str | None = None) -> list[float]:
        return [
            float(r["norm_test_score"])
            for r in sel(method, start)
            if task is None or r["task"] == task
        ]

    def iqm(method: str, start: str | None = None):
        by_task = [np.array(scores(method, start, t)) for t in tasks]
        by_task = [x for x in by_task if x.size]
        return iqm_ci(by_task, reps=2000, seed=0) if by_task else None

    lines = [
        f"# Goals of issue #15 on `{folder.name}` (policy `{a.policy}`)",
        "",
        f"Made by `python experiments/goals.py {a.folder} --policy {a.policy}` from "
        "`results.csv` (normalised test scores; IQM with 95% stratified bootstrap CI over "
        f"{len(tasks)} tasks x seeds). Test tasks only report; nothing here chose anything.",
        "",
        "## Quality (default start)",
        "",
        "| method | IQM [95% CI] |",
        "|---|---|",
    ]
    pol = iqm(a.policy, "default")
    for m in [a.policy, "warmup-cosine", "schedulefree", "prodigy", a.optuna, "static"]:
        r = iqm(m, "default")
        if r is not None:
            lines.append(f"| {m} | {r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}] |")
    lines.append("")
    for m in ["warmup-cosine", "schedulefree", "prodigy", a.optuna]:
        r = iqm(m, "default")
        if r is not None and pol is not None:
            ok = pol[0] >= r[0]
            lines.append(
                f"- policy IQM >= {m}: **{'met' if ok else 'not met'}** "
                f"({pol[0]:.3f} vs {r[0]:.3f}, difference {pol[0] - r[0]:+.3f})"
            )
    st = iqm("static", "default")
    if st is not None and pol is not None:
        ok = pol[1] > st[2]
        lines.append(
            f"- policy CI above static's: **{'met' if ok else 'not met'}** "
            f"(policy lower bound {pol[1]:.3f}, static upper bound {st[2]:.3f})"
        )
    lines += ["", "## No harm (default start): median >= static median - 0.01", ""]
    lines += [
        "| task | policy median | static median | difference | met |",
        "|---|---|---|---|---|",
    ]
    harmed = 0
    for t in tasks:
        p, s = scores(a.policy, "default", t), scores("static", "default", t)
        if not p or not s:
            continue
        mp, ms = statistics.median(p), statistics.median(s)
        ok = mp >= ms - 0.01
        harmed += not ok
        lines.append(
            f"| {t} | {mp:.3f} | {ms:.3f} | {mp - ms:+.3f} | {'yes' if ok else '**no**'} |"
        )
    lines += ["", f"Tasks harmed: **{harmed}** of {len(tasks)}.", ""]
    lines += ["## Bad start (lr 1e-5): share of the static(1e-5) -> Optuna gap closed", ""]
    lines += [
        "| task | static 1e-5 | policy 1e-5 | Optuna | gap closed | met (>= 90%) |",
        "|---|---|---|---|---|---|",
    ]
    missed = 0
    for t in tasks:
        s, p, o = (
            scores("static", "low-lr", t),
            scores(a.policy, "low-lr", t),
            scores(a.optuna, None, t),
        )
        if not (s and p and o):
            continue
        ms, mp, mo = statistics.median(s), statistics.median(p), statistics.median(o)
        gap = mo - ms
        if gap < 0.02:
            ok, share = mp >= mo - 0.02, "—"
        else:
            frac = (mp - ms) / gap
            ok, share = frac >= 0.9, f"{frac:.0%}"
        missed += not ok
        lines.append(
            f"| {t} | {ms:.3f} | {mp:.3f} | {mo:.3f} | {share} | {'yes' if ok else '**no**'} |"
        )
    lines += ["", f"Tasks below 90%: **{missed}** of {len(tasks)}.", ""]
    lines += ["## Cost (medians over tasks x seeds, relative to static default)", ""]
    for start in ("default", "low-lr"):
        steps = [float(r["steps_ratio"]) for r in sel(a.policy, start)]
        walls = [float(r["compute_ratio"]) for r in sel(a.policy, start) if r["compute_ratio"]]
        if steps:
            lines.append(
                f"- start {start}: optimizer steps {statistics.median(steps):.2f}x "
                f"(goal <= 1.0x: {'met' if statistics.median(steps) <= 1.0 + 1e-9 else 'not met'}), "
                f"wall time {statistics.median(walls):.2f}x (goal <= 1.25x: "
                f"{'met' if statistics.median(walls) <= 1.25 else 'not met'}; max {max(walls):.2f}x)"
            )
    (folder / "goals.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {folder / 'goals.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
