"""Where one LOFO variant leaves "keep", per held-out family, in each of the four
settings of the selection rule (vine_lofo.py RULE_SETTINGS): a markdown table and a
plot, for a policy card.

    python experiments/transfer/variant_decisions.py vine-c05-all-w-e5q3 \
        --png rlhpo/policies/default/decisions.png

Reads ``vine_lofo{_SETTING}/results.csv`` (all training seeds of the variant).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vine_lofo import RULE_SETTINGS as SETTINGS  # noqa: E402
from vine_lofo import finish_decision_plot  # noqa: E402

MOVES = {0: "x1/4", 1: "x1/2", 3: "x2", 4: "x4"}


def rows_of(variant: str) -> dict[str, list[dict]]:
    out = {}
    for s in SETTINGS:
        path = HERE / ("vine_lofo" + (f"_{s}" if s else "")) / "results.csv"
        if not path.is_file():
            raise SystemExit(f"no LOFO results for setting {s or 'committed'!r}: {path}")
        rows = [r for r in csv.DictReader(path.open()) if r["variant"] == variant]
        if not rows:
            raise SystemExit(f"variant {variant!r} has no rows in {path}")
        out[s] = rows
    return out


def table(by_setting: dict[str, list[dict]]) -> str:
    folds = sorted({r["fold"] for rows in by_setting.values() for r in rows})
    lines = [
        "| family | "
        + " | ".join(
            f"`{s or 'committed'}`: moves (runs moved); x1/4, x1/2, x2, x4" for s in SETTINGS
        )
        + " |",
        "|---|" + "---|" * len(SETTINGS),
    ]
    for f in folds:
        cells = []
        for s in SETTINGS:
            rs = [r for r in by_setting[s] if r["fold"] == f]
            mv = [int(m) for r in rs for m in r["moves"].split()]
            moved = sum(int(r["moved"]) for r in rs)
            cells.append(
                f"{len(mv)} ({moved}/{len(rs)}); " + ", ".join(str(mv.count(i)) for i in MOVES)
            )
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(variant: str, by_setting: dict[str, list[dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds = sorted({r["fold"] for rows in by_setting.values() for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(SETTINGS)
    for j, s in enumerate(SETTINGS):
        share = []
        for f in folds:
            rs = [r for r in by_setting[s] if r["fold"] == f]
            share.append(sum(int(r["moved"]) for r in rs) / len(rs))
        ax1.bar(np.arange(len(folds)) + j * width, share, width, label=s or "committed (x1)")
        fr = {
            d: [
                float(x)
                for r in by_setting[s]
                for m, x in zip(r["moves"].split(), r["move_fracs"].split(), strict=True)
                if (int(m) > 2) == (d == "up")
            ]
            for d in ("down", "up")
        }
        for d, style in (("up", "-"), ("down", ":")):
            if fr[d]:
                counts, edges = np.histogram(fr[d], bins=np.linspace(0, 1, 11))
                ax2.step(
                    edges[:-1],
                    counts,
                    where="post",
                    linestyle=style,
                    color=f"C{j}",
                    label=f"{s or 'committed'}: lr {d}",
                )
    finish_decision_plot(
        fig, folds, width, f"{variant}: held-out family (3 train seeds x 3 eval seeds)", "it", png
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant")
    ap.add_argument("--png", type=Path, required=True)
    a = ap.parse_args(argv)
    by_setting = rows_of(a.variant)
    plot(a.variant, by_setting, a.png)
    print(table(by_setting))
    for s in SETTINGS:
        fr = [float(x) for r in by_setting[s] for x in r["move_fracs"].split()]
        med = f"{statistics.median(fr):.2f}" if fr else "-"
        print(f"{s or 'committed'}: median budget fraction of the moves {med}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
