"""Transfer ablation: one row per policy variant tried for issue #7.

For every variant in ``variants.toml`` (name, policy directory, what changed):

- **train-split score** (the only number used to choose between variants): mean final
  normalised *validation* score over the default suite's train tasks, from the
  env's random starts (lr log-uniform 1e-5..3e-2, so bad starts are included) and
  6 seeds per task: the protocol of ``experiments/eval_policy.py``;
- **test-split IQM** (reported, never used to choose): the IQM normalised test
  score with its 95% stratified-bootstrap CI from ``rlhpo compare`` on the test
  split, 5 seeds, from the default start and from lr 1e-5 (``low-lr``);
- **steps x static** (median optimizer steps over the static default's);
- **training wall time** from the policy's manifest.

    python experiments/transfer/ablation.py            # evaluate what is missing, write
    python experiments/transfer/ablation.py --report   # only rewrite the table

Writes ``experiments/transfer/ablation.md``; the train-split scores are cached in
``train_scores.json`` and the test cells in ``compare-test/`` (resumable).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import tomllib

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from rlhpo.compare.report import read_csv  # noqa: E402
from rlhpo.compare.stats import iqm_ci  # noqa: E402
from rlhpo.env import HPOEnv  # noqa: E402
from rlhpo.policy import load_policy  # noqa: E402
from rlhpo.tasks import load_suite  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SEEDS_TRAIN = 6
SEEDS_TEST = 5
STARTS = ("default", "low-lr")
# Shifted train tasks: every run's learning rate x a hidden factor in [1/4, 4], so each
# task's best learning rate moves. A train-split proxy for "a model whose best learning
# rate differs from the train tasks'"; chosen before any variant's test score was seen.
SHIFT = (0.25, 4.0)
# The train-split score is taken on the first ten train tasks of the default suite, the
# ones every variant was trained on (later variants train on more), so rows compare.
EVAL_TASKS = (
    "mnist1d-mlp", "digits-mlp", "digits-cnn", "wine-mlp", "clf-binary-mlp",
    "clf-5class-mlp", "clf-noisy-mlp", "friedman-mlp", "regression-mlp", "seq-gru",
)  # fmt: skip


def _eval_module():
    spec = importlib.util.spec_from_file_location(
        "eval_policy", ROOT / "experiments/eval_policy.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_variants(path: Path) -> list[dict]:
    data = tomllib.loads(path.read_text())
    out = []
    for v in data.get("variant", []):
        missing = {"name", "policy", "change"} - set(v)
        if missing:
            raise SystemExit(f"{path}: a [[variant]] lacks {sorted(missing)}: {v}")
        out.append(v)
    return out


def train_score(policy_dir: str, method: str = "policy", lr_scale=(1.0, 1.0)) -> dict:
    """Mean final normalised validation score on the train split (random starts);
    with ``lr_scale``, every run's learning rate is multiplied by a hidden factor
    (the same for every method on a given task and seed)."""
    ev = _eval_module()
    suite = load_suite("default-v1")
    assert set(EVAL_TASKS) <= set(suite.train), "EVAL_TASKS must stay in the train split"
    pol = load_policy(ROOT / policy_dir) if method == "policy" else None
    penalty = pol.manifest.get("env", {}).get("compute_penalty", 0.1) if pol else 0.1
    scores, steps, t0 = [], [], time.time()
    for ti, task in enumerate(EVAL_TASKS):
        env = HPOEnv(
            suite,
            split="train",
            tasks=[task],
            compute_penalty=penalty,
            timing=True,
            lr_scale=lr_scale,
        )
        for seed in range(SEEDS_TRAIN):
            r = ev.run_episode(env, task, ev.episode_seed(ti, seed), method, pol)
            scores.append(r["final_score"])
            steps.append(r["steps_ratio"])
    x = np.array(scores)
    lo, hi = ev.bootstrap_ci(x)
    return {
        "mean": float(x.mean()),
        "ci": [lo, hi],
        "steps_ratio": float(np.median(steps)),
        "episodes": len(x),
        "seconds": round(time.time() - t0, 1),
    }


def run_test_compare(variants: list[dict], out: Path, workers: int) -> None:
    methods = ["static"] + [f"policy:{v['policy']}?name={v['name']}" for v in variants]
    cmd = [
        sys.executable, "-m", "rlhpo.cli", "compare", "--suite", "default-v1", "--split", "test",
        "--methods", ",".join(methods), "--seeds", str(SEEDS_TEST),
        "--starts", ",".join(STARTS), "--workers", str(workers), "--no-wandb",
        "--out", str(out.relative_to(ROOT)),
    ]  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def test_rows(out: Path) -> dict[tuple[str, str], dict]:
    rows = read_csv(out / "results.csv")
    tasks = sorted({r["task"] for r in rows})
    res = {}
    for key in {(r["method"], r["start"]) for r in rows}:
        rs = [r for r in rows if (r["method"], r["start"]) == key]
        groups = [[float(r["norm_test_score"]) for r in rs if r["task"] == t] for t in tasks]
        res[key] = {
            "iqm": iqm_ci(groups),
            "steps": float(np.median([r["steps_ratio"] for r in rs])),
            "n": len(rs),
        }
    return res


def write(variants, scores, tests, out_md: Path, base: dict) -> None:
    lines = [
        "# Transfer ablation (issue #7): one row per change tried",
        "",
        "Command: `python experiments/transfer/ablation.py` (variants in "
        "`experiments/transfer/variants.toml`).  ",
        f"Train-split score: mean final normalised **validation** score over the default "
        f"suite's first {len(EVAL_TASKS)} train tasks x {SEEDS_TRAIN} random starts "
        "(lr log-uniform 1e-5..3e-2), with a bootstrap 95% CI. Shifted train tasks: the same "
        "runs with every learning rate multiplied by a hidden factor log-uniform in [1/4, 4] "
        "(the same factor for every variant on a given task and seed), a train-split proxy "
        "for a new model whose best learning rate differs. Selection score: the mean of the "
        "two; it is the only number used to choose a variant. Test-split IQM: normalised test score on the 4 held-out tasks x "
        f"{SEEDS_TEST} seeds, IQM with a 95% stratified bootstrap CI, from `rlhpo compare` "
        "(cells in `compare-test/`); reported, never used to choose. Steps: median optimizer "
        "steps / the static default's. Machine: 2 cores shared between concurrent jobs, 1 torch "
        "thread per process.",
        "",
        "| variant | what changed | train-split val score [95% CI] | shifted train tasks "
        "| selection score | steps (train) "
        "| test IQM, default start | test IQM, lr 1e-5 start | steps (test) | training |",
        "|---|---|---|---|---:|---:|---|---|---:|---|",
    ]

    def ci(t):
        return f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"

    for name, change, sc, wall in [
        ("noop", "do nothing (static at the start configuration)", base, None)
    ] + [(v["name"], v["change"], scores.get(v["name"]), v.get("_wall")) for v in variants]:
        sh = scores.get(name + "@shift")
        trn = f"{sc['mean']:.3f} [{sc['ci'][0]:.3f}, {sc['ci'][1]:.3f}]" if sc else "—"
        trs = f"{sh['mean']:.3f} [{sh['ci'][0]:.3f}, {sh['ci'][1]:.3f}]" if sh else "—"
        sel = f"{(sc['mean'] + sh['mean']) / 2:.3f}" if sc and sh else "—"
        stp = f"{sc['steps_ratio']:.2f}x" if sc else "—"
        method = "static" if name == "noop" else name
        d = tests.get((method, "default"))
        lo = tests.get((method, "low-lr"))
        tst_d = ci(d["iqm"]) if d else "—"
        tst_l = ci(lo["iqm"]) if lo else "—"
        tsteps = f"{d['steps']:.2f}x" if d else "—"
        tw = f"{wall / 60:.1f} min" if wall else "—"
        lines.append(
            f"| {name} | {change} | {trn} | {trs} | {sel} | {stp} | {tst_d} | {tst_l} "
            f"| {tsteps} | {tw} |"
        )
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=str(HERE / "variants.toml"))
    ap.add_argument("--report", action="store_true", help="only rewrite the table")
    ap.add_argument("--no-test", action="store_true", help="skip the test-split compare")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    variants = load_variants(Path(a.variants))
    cache = HERE / "train_scores.json"
    scores = json.loads(cache.read_text()) if cache.exists() else {}
    for v in variants:
        v["_wall"] = load_policy(ROOT / v["policy"]).manifest.get("train_wall_time_s")
    if not a.report:
        if "noop" not in scores:
            scores["noop"] = train_score("", method="noop")
        if "noop@shift" not in scores:
            scores["noop@shift"] = train_score("", method="noop", lr_scale=SHIFT)
        for v in variants:
            for key, shift in ((v["name"], (1.0, 1.0)), (v["name"] + "@shift", SHIFT)):
                if key not in scores:
                    print(f"train split: {key}", flush=True)
                    scores[key] = train_score(v["policy"], lr_scale=shift)
                    cache.write_text(json.dumps(scores, indent=1) + "\n")
        cache.write_text(json.dumps(scores, indent=1) + "\n")
        if not a.no_test:
            run_test_compare(variants, HERE / "compare-test", a.workers)
    out = HERE / "compare-test"
    tests = test_rows(out) if (out / "results.csv").exists() else {}
    write(variants, scores, tests, HERE / "ablation.md", scores.get("noop"))


if __name__ == "__main__":
    main()
