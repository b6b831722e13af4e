"""Leave-one-family-out validation of policy variants (issue #15).

For every variant in ``lofo_variants.toml`` and every fold of the default suite
(``Suite.folds()``: one train family held out), a PPO policy is trained with
``rlhpo train`` on the other families' train tasks only, with the fold's own
training seed, and then run on the held-out family's train-split instances with
``rlhpo compare`` (final normalised *validation* score; the test split of the
suite is never touched, and no task's test data is used to choose). The seeds of
a variant are its folds' training seeds (one per fold: 8 seeds per variant).

A reference comparison (static default, the tuned warm-up + cosine schedule) runs
once on every train task with the same seeds and starts.

    python experiments/transfer/lofo.py --jobs 2              # train + evaluate what is missing
    python experiments/transfer/lofo.py --variants residual   # only some variants
    python experiments/transfer/lofo.py --report              # rewrite lofo.md only
    python experiments/transfer/lofo.py --report --root experiments/transfer/lofo
        # the same table from the committed results.csv files and fold policies

Everything is resumable: a finished fold is skipped, an interrupted training resumes
from its checkpoint, an interrupted comparison from its results. The selection rule
is in ``lofo_variants.toml`` and was committed before any policy of this protocol
was run on the test split.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SUITE = "default"
EVAL_SEEDS = "0,1,2"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
}


def _variants(path: Path) -> list[dict]:
    return tomllib.loads(path.read_text())["variant"]


def _folds():
    from rlhpo.tasks import load_suite

    return load_suite(SUITE).folds()


def _cli(*args: str, log: Path) -> None:
    cmd = [sys.executable, "-m", "rlhpo.cli", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")


def _train(v: dict, i: int, fold, root: Path) -> Path:
    if "policy" in v:  # a fixed policy (not trained per fold): evaluated as it is
        return ROOT / v["policy"] if not v["policy"].startswith("/") else Path(v["policy"])
    out = root / v["name"] / fold.family
    pol = out / "policy" / "manifest.json"
    if pol.is_file():
        return out / "policy"
    args = [
        "train", "--agent", "ppo", "--suite", SUITE, "--seed", str(i),
        "--timesteps", str(v["timesteps"]), "--out", str(out), "--no-wandb",
        "--set", "tasks=[" + ",".join(f'"{t}"' for t in fold.train) + "]",
    ]  # fmt: skip
    for s in v.get("set", []):
        args += ["--set", s]
    if (out / "checkpoint.json").is_file() or any(out.glob("checkpoint*")):
        args.append("--resume")
    _cli(*args, log=out / "lofo.log")
    return out / "policy"


def _evaluate(v: dict, fold, pol: Path, root: Path) -> Path:
    out = root / v["name"] / fold.family / "eval"
    methods = [f"policy:{pol}", f"policy:{pol}?guard=off"][: 2 if v.get("guard_off", True) else 1]
    _cli(
        "compare", "--suite", SUITE, "--split", "train", "--tasks", ",".join(fold.val),
        "--methods", ",".join(methods), "--seeds", EVAL_SEEDS, "--starts", v.get("starts", "default,low-lr"),
        "--workers", "1", "--no-wandb", "--bootstrap-reps", "200", "--out", str(out),
        log=root / v["name"] / fold.family / "lofo.log",
    )  # fmt: skip
    return out / "results.csv"


def _reference(root: Path) -> Path:
    from rlhpo.tasks import load_suite

    out = root / "reference"
    _cli(
        "compare", "--suite", SUITE, "--split", "train", "--tasks", ",".join(load_suite(SUITE).train),
        "--methods", "static,warmup-cosine", "--seeds", EVAL_SEEDS, "--starts", "default,low-lr",
        "--workers", "1", "--no-wandb", "--bootstrap-reps", "200", "--out", str(out),
        log=root / "reference.log",
    )  # fmt: skip
    return out / "results.csv"


def _job(v: dict, i: int, fold, root: Path) -> str:
    t0 = time.time()
    pol = _train(v, i, fold, root)
    _evaluate(v, fold, pol, root)
    return f"{v['name']}/{fold.family}: done in {time.time() - t0:.0f} s"


# -- report -------------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def report(root: Path, variants: list[dict], out_md: Path) -> None:
    folds = _folds()
    ref = _rows(root / "reference" / "results.csv")
    ref_score: dict[tuple, float] = {}  # (method, task, seed, start) -> val score
    for r in ref:
        ref_score[(r["method"], r["task"], r["seed"], r["start"])] = float(r["norm_val_score"])

    def ref_of(method: str, task: str, seed: str, start: str) -> float | None:
        return ref_score.get(
            (method, task, seed, start), ref_score.get((method, task, seed, "any"))
        )

    lines = [
        "# Leave-one-family-out validation (issue #15)",
        "",
        "Each cell: the variant's policy trained without that family (training seed = fold "
        "index), run on the family's train-split instances (seeds "
        f"{EVAL_SEEDS}; starts as listed), **final normalised validation score** (mean over "
        "tasks x seeds x starts). The suite's test split is not used. `guard` = the do-no-harm "
        "guard (collapse rule) at evaluation; `Δ static` = mean difference to the static "
        "default run on the same task, seed and start; `harm` = tasks of the fold whose "
        "median is below the static median by more than 0.01.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, 1 torch thread per process.",
        "",
    ]
    header = ["variant", "guard"] + [f.family for f in folds] + [
        "mean", "Δ static", "Δ warmup-cosine", "harm (tasks)", "train min (mean)", "episodes (mean)",
    ]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summary = {}
    for v in variants:
        for guard in (True, False)[: 2 if v.get("guard_off", True) else 1]:
            cells, all_scores, d_static, d_wc, harm, mins, eps = [], [], [], [], 0, [], []
            complete = True
            for fold in folds:
                base = root / v["name"] / fold.family
                rows = [
                    r
                    for r in _rows(base / "eval" / "results.csv")
                    if r["kind"] == "policy" and (r["method"].endswith("-noguard") != guard)
                ]
                if v.get("starts") == "default":
                    # A residual policy replaces the start's lr: its low-lr runs are its
                    # default runs (tests/test_residual.py), counted under both starts.
                    rows = rows + [{**r, "start": "low-lr"} for r in rows]
                if not rows:
                    cells.append("—")
                    complete = False
                    continue
                if "policy" not in v:
                    man = json.loads((base / "policy" / "manifest.json").read_text())
                    mins.append(man["train_wall_time_s"] / 60)
                    eps.append(man["episodes"])
                sc = [float(r["norm_val_score"]) for r in rows]
                all_scores += sc
                cells.append(f"{_mean(sc):.3f}")
                for r in rows:
                    s = ref_of("static", r["task"], r["seed"], r["start"])
                    w = ref_of("warmup-cosine", r["task"], r["seed"], r["start"])
                    if s is not None:
                        d_static.append(float(r["norm_val_score"]) - s)
                    if w is not None:
                        d_wc.append(float(r["norm_val_score"]) - w)
                for t in fold.val:
                    mine = [float(r["norm_val_score"]) for r in rows if r["task"] == t]
                    st = [
                        s
                        for r in rows
                        if r["task"] == t
                        and (s := ref_of("static", t, r["seed"], r["start"])) is not None
                    ]
                    if mine and st and _median(mine) < _median(st) - 0.01:
                        harm += 1
            m = _mean(all_scores)
            summary[(v["name"], guard)] = {"mean": m, "complete": complete, "harm": harm}
            lines.append(
                "| "
                + " | ".join(
                    [
                        v["name"],
                        "on" if guard else "off",
                        *cells,
                        f"{m:.3f}",
                        f"{_mean(d_static):+.3f}",
                        f"{_mean(d_wc):+.3f}",
                        str(harm),
                        f"{_mean(mins):.1f}",
                        f"{_mean(eps):.0f}",
                    ]  # fmt: skip
                )
                + " |"
            )
    # References on the same tasks, seeds and starts
    for method in ("static", "warmup-cosine"):
        cells, alls = [], []
        for fold in folds:
            sc = [
                float(r["norm_val_score"])
                for r in ref
                if r["method"] == method and r["task"] in fold.val
            ]
            alls += sc
            cells.append(f"{_mean(sc):.3f}" if sc else "—")
        lines.append(
            "| "
            + " | ".join(
                [f"*{method}* (reference)", "—", *cells, f"{_mean(alls):.3f}", "", "", "", "", ""]
            )
            + " |"
        )
    lines += ["", "## Variants", ""]
    for v in variants:
        how = (
            f"`{v['policy']}`, not trained per fold"
            if "policy" in v
            else f"`--timesteps {v['timesteps']}`; `{' '.join('--set ' + s for s in v.get('set', []))}`"
        )
        lines.append(f"- **{v['name']}**: {v['change']} ({how})")
    ok = {k: s for k, s in summary.items() if s["complete"]}
    if ok:
        top = max(s["mean"] for s in ok.values())
        trained = {v["name"]: "policy" not in v for v in variants}
        tied = {k: s for k, s in ok.items() if s["mean"] >= top - 0.005}
        # The rule: best mean; within 0.005, fewer harmed tasks, then no training. Not in
        # the rule (added when it was needed): then the guard on, the documented default.
        (name, guard), best = min(
            tied.items(), key=lambda kv: (kv[1]["harm"], trained[kv[0][0]], not kv[0][1])
        )
        tied_txt = ", ".join(
            f"{n} guard {'on' if g else 'off'} ({s['mean']:.3f}, harm {s['harm']})"
            for (n, g), s in sorted(tied.items())
        )
        lines += [
            "",
            "## Selection (the rule in `lofo_variants.toml`)",
            "",
            f"Best mean validation score {top:.3f}. Tied (within 0.005): {tied_txt}.",
            f"Pick: **{name}**, guard **{'on' if guard else 'off'}** ({best['mean']:.3f}; harm "
            f"on {best['harm']} task(s)): among tied rows the fewest harmed tasks, then one "
            "without training, then (not written in the rule, needed here because guard "
            "on and off tied) the guard on, the documented default.",
        ]
    out_md.write_text("\n".join(lines) + "\n")
    print(f"wrote {out_md}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants-file", default=str(HERE / "lofo_variants.toml"))
    p.add_argument("--variants", default="", help="comma-separated names (default: all)")
    p.add_argument("--folds", default="", help="comma-separated families (default: all)")
    p.add_argument("--root", default=os.environ.get("RLHPO_LOFO_ROOT", "/work/runs/lofo"))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="skip the reference comparison")
    p.add_argument("--out", default=str(HERE / "lofo.md"))
    a = p.parse_args(argv)
    root = Path(a.root)
    variants = _variants(Path(a.variants_file))
    if a.variants:
        names = set(a.variants.split(","))
        variants = [v for v in variants if v["name"] in names]
    if not a.report:
        folds = [f for f in _folds() if not a.folds or f.family in a.folds.split(",")]
        jobs = [(v, i, f) for v in variants for i, f in enumerate(_folds()) if f in folds]
        t0 = time.time()
        with ThreadPoolExecutor(a.jobs) as ex:
            futs = [] if a.no_reference else [ex.submit(_reference, root)]
            futs += [ex.submit(_job, v, i, f, root) for v, i, f in jobs]
            for fu in futs:
                try:
                    print(fu.result(), flush=True)
                except Exception as e:  # noqa: BLE001 - report and go on with the rest
                    print(f"FAILED: {e}", flush=True)
        print(f"all jobs: {time.time() - t0:.0f} s")
    report(root, _variants(Path(a.variants_file)), Path(a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
