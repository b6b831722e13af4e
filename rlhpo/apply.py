"""``rlhpo apply``: run one task of a suite under a saved policy, the way a user would.

The run is a :class:`~rlhpo.trainees.Trainee` driven by a
:class:`~rlhpo.controller.Controller` (not the environment's ``step``): the same
path as a user's own loop. It starts exactly as ``HPOEnv.reset(seed=seed)``
would (same model initialisation, data order and, for ``start="random"``, the
same starting hyperparameters), so its numbers compare with episodes and
baselines run at the same seed. Writes ``trace.csv``, ``curves.png`` and
``log.jsonl`` (plus an offline W&B run unless disabled) into the output folder.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhpo.starts import NAMED_STARTS, START_DRAWN

#: Named starts (rlhpo.starts) and the start drawn from the task's distribution.
STARTS = (*NAMED_STARTS, START_DRAWN)

TRACE_FIELDS = (
    "interval",
    "samples",
    "optimizer_steps",
    "train_seconds",
    "lr",
    "batch_size",
    "dropout",
    "train_loss",
    "val_loss",
    "val_score",
    "val_norm_score",
    "rolled_back",
)


@dataclass
class IntervalRow:
    """One line of the trace: the hyperparameters an interval was trained with and
    the metrics after it (interval 0: the untrained model and the start values)."""

    interval: int
    samples: int
    optimizer_steps: int
    train_seconds: float
    lr: float
    batch_size: int
    dropout: float
    train_loss: float | None
    val_loss: float
    val_score: float
    val_norm_score: float
    rolled_back: bool = False


@dataclass
class ApplyResult:
    task: str
    seed: int
    start: str
    budget_samples: int
    rows: list[IntervalRow]
    test: dict[str, float]
    samples: int
    optimizer_steps: int
    static_steps: int
    train_seconds: float
    controller_seconds: float
    wall_seconds: float
    rollbacks: int
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    static: dict[str, Any] | None = None
    """With ``vs_static``: the static run from the same start and seed (test score,
    samples, optimizer steps, training seconds) and the policy run's ratios to it."""

    @property
    def final(self) -> IntervalRow:
        return self.rows[-1]


def apply_policy(
    policy_dir: str | os.PathLike[str],
    task: str,
    *,
    suite: str = "default",
    seed: int = 0,
    start: str = "default",
    budget_scale: float = 1.0,
    out_dir: str | os.PathLike[str] | None = None,
    use_wandb: bool = True,
    deterministic: bool = True,
    on_row: Callable[[IntervalRow], None] | None = None,
    vs_static: bool = False,
) -> ApplyResult:
    """Train ``task`` for its whole budget with ``policy_dir`` choosing the hyperparameters.

    ``vs_static`` also trains the run the policy started from, unchanged (same start,
    initialisation and data order), and records both runs' cost: the policy run's
    optimizer steps and training wall time relative to the static run's."""
    from rlhpo.controller import Controller
    from rlhpo.env import HPOEnv
    from rlhpo.policy import load_policy
    from rlhpo.tracking import Tracker

    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}; got {start!r}")
    policy = load_policy(policy_dir)
    env = HPOEnv(suite, split="all", tasks=[task], budget_scale=budget_scale)
    spec = env.tasks[task]
    out = Path(out_dir) if out_dir is not None else _default_out(task, seed)
    if (out / "trace.csv").exists():
        raise FileExistsError(f"{out} already holds a trace.csv; choose another --out")
    options: dict[str, Any] = {"task": task, "start": start}
    env.reset(seed=seed, options=options)  # builds the run exactly as an episode starts
    tr = env.trainee
    ctl = Controller.for_trainee(
        policy,
        tr,
        budget_samples=spec.budget_samples,
        deterministic=deterministic,
        interval_samples=spec.interval_samples,
        optimizer_kind=spec.optimizer,
    )
    config = {
        "policy": str(policy_dir),
        "policy_agent": policy.manifest.get("agent"),
        "suite": env.suite.name,
        "task": task,
        "seed": seed,
        "start": start,
        "start_hp": tr.hp,
        "budget_samples": spec.budget_samples,
        "budget_scale": budget_scale,
        "intervals": spec.intervals,
        "deterministic": deterministic,
    }
    t_wall = time.perf_counter()
    rows: list[IntervalRow] = []
    ctl_seconds, static_steps = 0.0, 0
    with Tracker(
        out,
        config=config,
        use_wandb=use_wandb,
        group="apply",
        name=f"apply-{task}-s{seed}",
        job_type="apply",
    ) as tracker:

        def emit(row: IntervalRow) -> None:
            rows.append(row)
            tracker.log(
                {
                    "val/score": row.val_score,
                    "val/loss": row.val_loss,
                    "val/norm_score": row.val_norm_score,
                    **({} if row.train_loss is None else {"train/loss": row.train_loss}),
                    "hp/lr": row.lr,
                    "hp/batch_size": row.batch_size,
                    "hp/dropout": row.dropout,
                    "run/samples": row.samples,
                    "run/optimizer_steps": row.optimizer_steps,
                    "controller/rollback": int(row.rolled_back),
                },
                step=row.interval,
            )
            if on_row is not None:
                on_row(row)

        ev = tr.evaluate()
        hp_used = dict(tr.hp)
        t0 = time.perf_counter()
        ctl.start(val_loss=ev["loss"], val_score=ev["score"])
        ctl_seconds += time.perf_counter() - t0
        emit(_row(0, tr, hp_used, None, ev, ctl, rolled_back=False))
        interval = 0
        while not ctl.done:
            hp_used = dict(tr.hp)
            n = min(spec.interval_samples, spec.budget_samples - tr.samples_seen)
            st = tr.train(n)
            static_steps += math.ceil(st.samples / spec.default["batch_size"])
            ev = tr.evaluate()
            t0 = time.perf_counter()
            d = ctl.step(
                train_loss=st.train_loss,
                val_loss=ev["loss"],
                val_score=ev["score"],
                samples=tr.samples_seen,
                batch_losses=st.batch_losses,
            )
            ctl_seconds += time.perf_counter() - t0
            interval += 1
            emit(_row(interval, tr, hp_used, st.train_loss, ev, ctl, rolled_back=d.rolled_back))
        test = tr.evaluate("test")  # reported only: never seen by the policy
        wall = time.perf_counter() - t_wall
        result = ApplyResult(
            task=task,
            seed=seed,
            start=start,
            budget_samples=spec.budget_samples,
            rows=rows,
            test=test,
            samples=tr.samples_seen,
            optimizer_steps=tr.optimizer_steps,
            static_steps=static_steps,
            train_seconds=tr.wall_time,
            controller_seconds=ctl_seconds,
            wall_seconds=wall,
            rollbacks=len(ctl.events),
            out_dir=out,
        )
        result.files["trace"] = write_trace(rows, out / "trace.csv")
        result.files["plot"] = plot_trace(rows, out / "curves.png", title=_title(result, spec))
        tracker.log_images({"curves": result.files["plot"]})
        tracker.summary(
            {
                "final/val_score": result.final.val_score,
                "final/val_loss": result.final.val_loss,
                "final/test_score": test["score"],
                "final/test_loss": test["loss"],
                "run/samples": result.samples,
                "run/optimizer_steps": result.optimizer_steps,
                "run/static_steps": static_steps,
                "run/train_seconds": result.train_seconds,
                "run/controller_seconds": ctl_seconds,
                "run/rollbacks": result.rollbacks,
            }
        )
        if vs_static:
            result.static = _static_run(spec, config["start_hp"], seed, result)
            tracker.summary({f"static/{k}": v for k, v in result.static.items()})
        if tracker.wandb_dir is not None:
            result.files["wandb"] = tracker.wandb_dir
    result.files["log"] = out / "log.jsonl"
    return result


def _static_run(spec, start_hp: dict[str, Any], seed: int, res: ApplyResult) -> dict[str, Any]:
    """The static run from the policy run's start: same hyperparameters, same run seed."""
    from rlhpo.baselines.single import run_single
    from rlhpo.env import run_seed_for

    out = run_single(spec, dict(start_hp), run_seed_for(seed))
    return {
        "test_score": out.test_score,
        "val_score": out.val_score,
        "samples": out.samples,
        "optimizer_steps": out.optimizer_steps,
        "train_seconds": out.train_time,
        "diverged": out.diverged,
        "steps_ratio": res.optimizer_steps / max(out.optimizer_steps, 1),
        "wall_ratio": res.train_seconds / out.train_time if out.train_time > 0 else math.nan,
    }


def _row(i, tr, hp, train_loss, ev, ctl, rolled_back) -> IntervalRow:
    from rlhpo.observation import normalised_score

    return IntervalRow(
        interval=i,
        samples=tr.samples_seen,
        optimizer_steps=tr.optimizer_steps,
        train_seconds=tr.wall_time,
        lr=float(hp["lr"]),
        batch_size=int(hp["batch_size"]),
        dropout=float(hp["dropout"]),
        train_loss=train_loss,
        val_loss=ev["loss"],
        val_score=ev["score"],
        val_norm_score=normalised_score(ctl.metric, ev["score"], ctl.n_classes),
        rolled_back=rolled_back,
    )


def _default_out(task: str, seed: int) -> Path:
    return Path("runs") / "apply" / f"{task}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def _title(r: ApplyResult, spec: Any) -> str:
    return (
        f"{r.task} ({spec.model} on {spec.dataset}), seed {r.seed}, start {r.start}: "
        f"val {r.final.val_score:.3f}, test {r.test['score']:.3f}"
    )


def write_trace(rows: list[IntervalRow], path: Path) -> Path:
    """The per-interval trace as CSV (written to a temporary name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TRACE_FIELDS)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            d["train_loss"] = "" if d["train_loss"] is None else d["train_loss"]
            w.writerow(d)
    os.replace(tmp, path)
    return path


def plot_trace(rows: list[IntervalRow], path: Path, title: str = "") -> Path:
    """Validation curve on top; lr, batch size and dropout traces below (x: samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.samples for r in rows]
    fig, axes = plt.subplots(
        4, 1, figsize=(8, 8), sharex=True, gridspec_kw={"height_ratios": [2.2, 1, 1, 1]}
    )
    ax = axes[0]
    ax.plot(x, [r.val_score for r in rows], "o-", color="C0", ms=3, label="val score")
    ax.set_ylabel("val score")
    ax2 = ax.twinx()
    ax2.plot(x, [r.val_loss for r in rows], "--", color="C1", lw=1, label="val loss")
    tl = [(r.samples, r.train_loss) for r in rows if r.train_loss is not None]
    if tl:
        ax2.plot(*zip(*tl, strict=True), ":", color="C2", lw=1, label="train loss")
    ax2.set_ylabel("loss")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    ax.set_title(title, fontsize=9)
    # Each interval's hyperparameters hold from the previous row's samples to its own.
    xs = [rows[i - 1].samples for i in range(1, len(rows))] + [rows[-1].samples]
    hp_rows = rows[1:] + rows[-1:]
    for a, key, label, log in (
        (axes[1], "lr", "lr", True),
        (axes[2], "batch_size", "batch size", True),
        (axes[3], "dropout", "dropout", False),
    ):
        a.step(xs, [getattr(r, key) for r in hp_rows], where="post", color="C3")
        a.set_ylabel(label)
        if log:
            a.set_yscale("log", base=10 if key == "lr" else 2)
        for r in rows:
            if r.rolled_back:
                a.axvline(r.samples, color="red", lw=0.8, alpha=0.6)
    axes[-1].set_xlabel("training samples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
