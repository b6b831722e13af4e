"""Plot a training run's curve from its JSONL log (``DIR/log.jsonl``).

    python experiments/plot_training_curve.py runs/ppo-default/log.jsonl \
        rlhpo/policies/default/training_curve.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def rolling(x: np.ndarray, w: int) -> np.ndarray:
    c = np.cumsum(np.insert(x, 0, 0.0))
    out = np.empty(len(x))
    for i in range(len(x)):
        lo = max(0, i + 1 - w)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("out")
    ap.add_argument("--window", type=int, default=100, help="episodes in the rolling mean")
    ap.add_argument("--title", default=None)
    a = ap.parse_args()
    recs = [json.loads(line) for line in open(a.log) if line.strip()]
    eps: list[dict] = []
    upd: list[dict] = []
    for r in recs:
        if r.get("event") == "resume":
            # Work logged after the last checkpoint was lost in the kill and redone.
            eps = [e for e in eps if e["timesteps"] <= r["timesteps"]]
            upd = [u for u in upd if u["timesteps"] <= r["timesteps"]]
        elif "agent/episode_return" in r:
            eps.append(r)
        elif "agent/entropy" in r:
            upd.append(r)
    if not eps:
        raise SystemExit(f"{a.log} holds no finished episodes")
    ts = np.array([r["timesteps"] for r in eps])
    ret = np.array([r["agent/episode_return"] for r in eps])
    score = np.array([r["val/norm_score"] for r in eps])
    ratio = np.array([r["train/steps_ratio"] for r in eps])
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.plot(ts, ret, ".", ms=2, alpha=0.25, color="C0")
    ax.plot(ts, rolling(ret, a.window), color="C0", label=f"return (mean of {a.window})")
    ax.plot(ts, rolling(score, a.window), color="C1", label="final val score (norm.)")
    ax.set_xlabel("env steps")
    ax.set_ylim(-0.6, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("episodes")
    ax = axes[1]
    ax.plot(ts, rolling(ratio, a.window), color="C2")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("env steps")
    ax.set_title("optimizer steps / default batch's steps")
    ax = axes[2]
    if upd:
        ax.plot([r["timesteps"] for r in upd], [r["agent/entropy"] for r in upd], color="C3")
    ax.set_xlabel("env steps")
    ax.set_title("policy entropy (nats, 3 heads)")
    start = next((r for r in recs if r.get("event") == "start"), {})
    cfg = start.get("config", {})
    fig.suptitle(
        a.title
        or f"{cfg.get('agent', '?')} on suite {cfg.get('suite', '?')} ({cfg.get('split', 'train')})"
    )
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out} ({len(eps)} episodes)")


if __name__ == "__main__":
    main()
