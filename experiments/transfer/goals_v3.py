"""Mark the test-split goals of issue #22 met or not, from a comparison folder.

    python experiments/transfer/goals_v3.py experiments/results/compare-v3-policy \
        --policy policy:vine --prior policy:v2-prior --rule rescue --static-now static-now

Reads ``results.csv`` (default start, or ``any``) and writes ``goals_v3.md`` beside it:
IQM of the learned policy against the prior, the rescue rule and Optuna-TPE-20;
the medians of bert-counting and gru-mnist1d; no harm on every task (median >= static
median - 0.01); the share of decisions that left "keep" (the ``moves`` / ``decisions``
of each policy cell's detail); optimizer steps and wall time against a static run of
the same session (``--static-now``).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import numpy as np

from rlhpo.compare.stats import iqm_ci


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--policy", required=True)
    ap.add_argument("--prior", default="policy:v2-prior")
    ap.add_argument("--rule", default="rescue")
    ap.add_argument("--optuna", default="optuna-tpe:20")
    ap.add_argument("--static-now", default="static-now")
    ap.add_argument(
        "--others",
        nargs="*",
        default=["warmup-cosine", "schedulefree", "prodigy", "static"],
        help="other methods reported beside (IQM and per-task medians)",
    )
    ap.add_argument(
        "--static",
        default="static",
        help="the static run the no-harm goal compares with (one made beside the policy)",
    )
    ap.add_argument(
        "--offpeak",
        nargs="*",
        default=[],
        metavar="POLICY=PRIOR",
        help="pairs of labels run at the same pinned peak factor (policy:..?base_peak=tuned"
        "&peak_factor=F): reported as IQMs and per-task medians, policy against prior",
    )
    a = ap.parse_args(argv)
    pairs = []
    for text in a.offpeak:
        pol, sep, pri = text.partition("=")
        if not sep or not pol or not pri:
            raise SystemExit(f"--offpeak must be POLICY=PRIOR labels, got {text!r}")
        pairs.append((pol, pri))
    folder = Path(a.folder)
    rows = [
        r
        for r in csv.DictReader((folder / "results.csv").open())
        if r["start"] in ("default", "any")
    ]
    tasks = sorted({r["task"] for r in rows})

    def scores(method: str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {t: [] for t in tasks}
        for r in rows:
            if r["method"] == method:
                out[r["task"]].append(float(r["norm_test_score"]))
        return out

    def iqm(method: str) -> tuple[float, float, float]:
        s = scores(method)
        mat = np.array([sorted(s[t]) for t in tasks if s[t]])
        return iqm_ci(mat, reps=2000, seed=0)

    lines = [
        "# Goals of issue #22 on the test split",
        "",
        f"From `{folder.name}/results.csv` (default start; start-independent methods "
        "`any`). Normalised test scores.",
        "",
        "| method | IQM [95% CI] |",
        "|---|---|",
    ]
    iq = {}
    for m in (a.policy, a.prior, a.rule, a.optuna, *a.others):
        if any(r["method"] == m for r in rows):
            iq[m] = iqm(m)
            lines.append(f"| {m} | {iq[m][0]:.3f} [{iq[m][1]:.3f}, {iq[m][2]:.3f}] |")
    for m in (a.static, *(m for pair in pairs for m in pair)):
        if m not in iq and any(r["method"] == m for r in rows):
            iq[m] = iqm(m)
            lines.append(f"| {m} | {iq[m][0]:.3f} [{iq[m][1]:.3f}, {iq[m][2]:.3f}] |")
    missing = sorted({a.policy, a.prior, a.rule, a.static} - set(iq))
    if missing:
        raise SystemExit(f"{folder / 'results.csv'} has no default-start rows of {missing}")
    p = iq[a.policy][0]
    pol, static = scores(a.policy), scores(a.static)
    med = {t: statistics.median(pol[t]) for t in tasks}
    harm = [t for t in tasks if med[t] < statistics.median(static[t]) - 0.01]
    moves = decisions = 0
    for r in rows:
        if r["method"] == a.policy:
            d = json.loads(r["detail"] or "{}")
            moves += int(d.get("moves", 0))
            decisions += int(d.get("decisions", 0))
    share = moves / decisions if decisions else float("nan")

    def mark(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lines += [
        "",
        "## Goals",
        "",
        f"- IQM >= 0.75: {p:.3f}: {mark(p >= 0.75)}.",
        f"- IQM >= the rescue rule's ({iq[a.rule][0]:.3f}): {mark(p >= iq[a.rule][0])}.",
        f"- IQM >= the prior's ({iq[a.prior][0]:.3f}): {mark(p >= iq[a.prior][0])}.",
    ]
    for t, goal in (("bert-counting", 0.90), ("gru-mnist1d", 0.30)):
        if t in med:
            lines.append(f"- {t} median >= {goal}: {med[t]:.3f}: {mark(med[t] >= goal)}.")
    lines.append(
        f"- No harm (median >= `{a.static}` median - 0.01): {len(tasks) - len(harm)} of "
        f"{len(tasks)} tasks: {mark(not harm)}"
        + (f" (harmed: {', '.join(harm)})." if harm else ".")
    )
    if a.optuna in iq:
        lines.append(
            f"- Stretch, IQM >= Optuna-TPE-20 ({iq[a.optuna][0]:.3f}): "
            f"{mark(p >= iq[a.optuna][0])}."
        )
    lines.append(
        f"- Leaves keep on >= 5% of decisions: {moves}/{decisions} = {share:.1%}: "
        f"{mark(share >= 0.05)}."
    )
    now = {(r["task"], r["seed"]): r for r in rows if r["method"] == a.static_now}
    ratios_w, ratios_s = [], []
    for r in rows:
        ref = now.get((r["task"], r["seed"]))
        if r["method"] == a.policy and ref is not None:
            ratios_w.append(float(r["wall_time"]) / float(ref["wall_time"]))
            ratios_s.append(float(r["optimizer_steps"]) / float(ref["optimizer_steps"]))
    if ratios_w:
        w, st = statistics.median(ratios_w), statistics.median(ratios_s)
        lines.append(
            f"- Cost against `{a.static_now}` (static, default start, same session): "
            f"median optimizer steps {st:.2f}x, wall time {w:.2f}x (goal <= 1.25x): "
            f"{mark(w <= 1.25)}."
        )
    for pol_m, pri_m in pairs:
        if pol_m in iq and pri_m in iq:
            mp, mq = scores(pol_m), scores(pri_m)
            worse = [
                t
                for t in tasks
                if mp[t] and statistics.median(mp[t]) < statistics.median(mq[t]) - 0.01
            ]
            lines.append(
                f"- `{pol_m}` against `{pri_m}` (the same base peak): IQM "
                f"{iq[pol_m][0]:.3f} against {iq[pri_m][0]:.3f} "
                f"({iq[pol_m][0] - iq[pri_m][0]:+.3f}); below the prior by more than 0.01 "
                f"on {len(worse)} of {len(tasks)} tasks"
                + (f" ({', '.join(worse)})." if worse else ".")
            )
    lines += [
        "",
        "## Per task: median normalised test score",
        "",
        "| task | " + " | ".join(m for m in iq) + " |",
        "|---|" + "---|" * len(iq),
    ]
    for t in tasks:
        lines.append(
            f"| {t} | "
            + " | ".join(
                f"{statistics.median(scores(m)[t]):.3f}" if scores(m)[t] else "" for m in iq
            )
            + " |"
        )
    (folder / "goals_v3.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
