"""`rlhpo demo`: the shipped default policy on a held-out task, next to the static
default, the plateau controller and a small Optuna study, as a small comparison."""

from __future__ import annotations

import time
from pathlib import Path

from rlhpo.compare.methods import parse_methods
from rlhpo.compare.runner import CompareConfig, CompareResult, run_comparison

DEFAULT_POLICY = "default"  # the shipped policy's name (rlhpo/policies/default)
DEMO_SUITE = "default-v1"  # the suite the shipped policy was trained and tested on


def run_demo(
    policy: str | Path = DEFAULT_POLICY,
    out: str | Path | None = None,
    task: str = "mnist1d-cnn",
    seeds: tuple[int, ...] = (0, 1),
    trials: int = 6,
    workers: int = 2,
    use_wandb: bool = True,
    console=None,
) -> CompareResult:
    """Run the demo comparison; raises FileNotFoundError naming a missing policy.
    ``policy`` is a policy directory or a shipped policy's name."""
    from rlhpo.shipped import policy_path

    if not (policy_path(policy) / "manifest.json").is_file():
        raise FileNotFoundError(
            f"the policy is missing: {policy} is no policy directory with a manifest.json "
            f"nor a shipped policy. Train one with `rlhpo train`, or pass --policy DIR"
        )
    out = Path(out) if out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    methods = parse_methods(f"policy:{policy}?name=policy,static,plateau,optuna-tpe:{trials}")
    cfg = CompareConfig(
        out=out,
        methods=methods,
        suite=DEMO_SUITE,
        split="test",
        tasks=[task],
        seeds=list(seeds),
        starts=["default", "low-lr"],
        workers=workers,
        use_wandb=use_wandb,
        bootstrap_reps=1000,
        command=(
            f"rlhpo demo --policy {policy} --task {task} --seeds {len(seeds)} "
            f"--trials {trials} --out {out}"
        ),
    )
    return run_comparison(cfg, console=console)
