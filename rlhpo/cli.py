"""The ``rlhpo`` command line: one command per job.

Each command is a thin wrapper: the work lives in the library modules, imported
lazily so that ``rlhpo --help`` and ``rlhpo tasks`` start fast.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

# Never hang or prompt on W&B: offline unless the user chose a mode.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="rlhpo: learn how to tune a neural network while it trains.",
)
# A fixed width when piped (CI logs) so tables are not squeezed to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 130)


def _fail(msg: str) -> None:
    from rich.markup import escape

    # One line, never wrapped, so scripts can grep it; escaped, since messages quote
    # install commands such as 'rlhpo[postgres]'.
    msg = str(msg).replace("\n", " ")
    console.print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _flag(name: str, help: str):
    """A boolean option shown as a plain flag (``--json``), not ``--json <bool>``."""
    return typer.Option(name, help=help, metavar="")


@app.command()
def tasks(
    suite: Annotated[
        str, typer.Option(help="Suite name (default, tiny) or path to a TOML file.")
    ] = "default",
    split: Annotated[str, typer.Option(help="train, test or all.")] = "all",
    as_json: Annotated[
        bool, _flag("--json", "Print JSON (suite, families, tasks, folds) instead of tables.")
    ] = False,
    folds: Annotated[bool, _flag("--folds", "Also list the leave-one-family-out folds.")] = False,
) -> None:
    """List a suite's task families, its tasks (drawn instances included) and folds."""
    from rlhpo.tasks import SpecError, load_suite

    try:
        s = load_suite(suite)
        specs = s.split(split)
    except SpecError as e:
        _fail(str(e))
    rows = []
    for t in specs:
        row = t.summary()
        row["split"] = "train" if t.name in s.train else "test"
        rows.append(row)
    fold_rows = [
        {"held_out_family": f.family, "train": list(f.train), "val": list(f.val)} for f in s.folds()
    ]
    if as_json:
        doc = {
            "suite": s.name,
            "seed": s.seed,
            "split": split,
            "families": [f.summary() for f in s.families],
            "tasks": rows,
            "folds": fold_rows,
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    if s.families:
        ft = Table(title=f"suite {s.name!r}: families (instances drawn with seed {s.seed})")
        for col in ("family", "instances", "models", "datasets", "ranges"):
            ft.add_column(col, justify="right" if col == "instances" else "left")
        for f in s.families:
            ranges = ", ".join(f"{k}={v}" for k, v in f.ranges.items())
            ft.add_row(f.name, str(f.instances), ",".join(f.models), ",".join(f.datasets), ranges)
        console.print(ft)
    cols = (
        "name",
        "split",
        "family",
        "dataset",
        "model",
        "optimizer",
        "metric",
        "budget_samples",
        "intervals",
    )
    table = Table(title=f"suite {s.name!r} ({split})")
    for col in cols:
        table.add_column(col, justify="right" if col in ("budget_samples", "intervals") else "left")
    for r in rows:
        table.add_row(*(str(r[c]) for c in cols))
    console.print(table)
    if folds:
        if not fold_rows:
            typer.echo("no folds: the train split holds fewer than two families")
        for f in fold_rows:
            typer.echo(
                f"fold {f['held_out_family']}: train {len(f['train'])} tasks, "
                f"val {', '.join(f['val'])}"
            )


@app.command()
def episode(
    suite: Annotated[str, typer.Option(help="Suite name or TOML path.")] = "default",
    task: Annotated[
        str, typer.Option(help="Task name (default: the suite's first test task).")
    ] = "",
    seed: Annotated[int, typer.Option(help="Episode seed.")] = 0,
    policy: Annotated[
        str, typer.Option(help="'noop' keeps the start hyperparameters, 'random' samples actions.")
    ] = "noop",
    start: Annotated[
        str, typer.Option(help="'default' or 'random' starting hyperparameters.")
    ] = "random",
    budget_scale: Annotated[float, typer.Option(help="Multiply the task's sample budget.")] = 1.0,
) -> None:
    """Run one episode of the environment and show hyperparameters and metrics per step."""
    from rlhpo.env import HPOEnv
    from rlhpo.tasks import SpecError, load_suite

    try:
        s = load_suite(suite)
        name = task or (s.test[0] if s.test else s.train[0])
        env = HPOEnv(s, split="all", tasks=[name], budget_scale=budget_scale, timing=True)
    except (SpecError, ValueError) as e:
        _fail(str(e))
    if policy not in ("noop", "random"):
        _fail(f"--policy must be noop or random, got {policy!r}")
    if start not in ("default", "random"):
        _fail(f"--start must be default or random, got {start!r}")
    show_episode(env, name, seed, policy, start)


def show_episode(env, task: str, seed: int, policy: str, start: str) -> None:
    """Run one episode and print a per-step table (used by ``episode`` and the demo)."""
    from rlhpo.actions import ActionCodec

    options = {"task": task}
    if start == "default":
        options["start"] = "default"
    obs, info = env.reset(seed=seed, options=options)
    env.action_space.seed(seed)
    table = Table(title=f"{task}: one episode, policy={policy}, seed={seed}")
    for col in (
        "step",
        "lr",
        "batch",
        "dropout",
        "train loss",
        "val loss",
        "val score",
        "reward",
        "samples",
    ):
        table.add_column(col, justify="right")
    table.add_row(
        "0",
        f"{info['hp']['lr']:.2e}",
        str(info["hp"]["batch_size"]),
        f"{info['hp']['dropout']:.2f}",
        "",
        f"{info['val_loss']:.4f}",
        f"{info['val_score']:.4f}",
        "",
        "0",
    )
    done, ret = False, 0.0
    while not done:
        action = ActionCodec.NOOP if policy == "noop" else env.action_space.sample()
        obs, r, term, trunc, info = env.step(action)
        ret += r
        done = term or trunc
        table.add_row(
            str(info["interval"]),
            f"{info['hp']['lr']:.2e}",
            str(info["hp"]["batch_size"]),
            f"{info['hp']['dropout']:.2f}",
            f"{info['train_loss']:.4f}",
            f"{info['val_loss']:.4f}",
            f"{info['val_score']:.4f}",
            f"{r:+.4f}",
            str(info["samples"]),
        )
    console.print(table)
    test = env.test_score()
    console.print(
        f"return {ret:+.4f} | final val {info['val_score']:.4f} | test {test['score']:.4f} | "
        f"{info['optimizer_steps']} optimizer steps ({info['static_steps']} at the default batch) | "
        f"{info['wall_time']:.2f} s training" + (" | DIVERGED" if info["diverged"] else "")
    )


DEFAULT_METHODS = (
    "policy:default,static,static-minbs,cosine,step,warmup-cosine,plateau,"
    "optuna-tpe:20,optuna-random:20,optuna-tpe-median:20,pbt:4"
)


def _seeds(text: str) -> list[int]:
    """``5`` -> seeds 0..4; ``0,3,7`` -> those seeds."""
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return list(range(n))
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--seeds must be a count >= 1 or a comma-separated list of integers, got {text!r}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        _fail(f"--seeds must list distinct integers >= 0, got {text!r}")
    return seeds


@app.command()
def compare(
    out: Annotated[str, typer.Option(help="Output folder; rerunning with it resumes.")],
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated methods: policy:DIR|NAME[?freeze=batch_size,dropout&name=N], "
            "static, static-bsN, static-minbs, cosine, step, warmup-cosine[?peak=LR], plateau, "
            "optuna-tpe|random[-median|-hyperband]:N, pbt:N."
        ),
    ] = DEFAULT_METHODS,
    suite: Annotated[
        str, typer.Option(help="Suite name (default, tiny) or TOML path.")
    ] = "default",
    split: Annotated[str, typer.Option(help="train, test or all.")] = "test",
    tasks: Annotated[str, typer.Option(help="Comma-separated task names (default: all).")] = "",
    seeds: Annotated[str, typer.Option(help="A count (0..N-1) or a list: 0,3,7.")] = "5",
    starts: Annotated[
        str, typer.Option(help="Starts of single-run methods: default, low-lr, high-lr.")
    ] = "default,low-lr",
    workers: Annotated[int, typer.Option(help="Parallel worker processes (1 thread each).")] = 2,
    executor: Annotated[str, typer.Option(help="local (processes) or ray (Ray tasks).")] = "local",
    address: Annotated[str, typer.Option(help="Ray cluster address (--executor ray).")] = "",
    storage: Annotated[
        str, typer.Option(help="Optuna RDB URL (default: a SQLite file per study in OUT).")
    ] = "",
    budget_scale: Annotated[float, typer.Option(help="Multiply every task's budget.")] = 1.0,
    no_wandb: Annotated[bool, _flag("--no-wandb", "JSONL logs only.")] = False,
    bootstrap_reps: Annotated[int, typer.Option(help="Bootstrap resamples for CIs.")] = 2000,
) -> None:
    """Compare tuning methods on a suite at equal sample budget: results.csv, summary.md, PNGs."""
    from pathlib import Path

    from rlhpo.compare import CompareConfig, CompareError, MethodError, parse_methods
    from rlhpo.compare.methods import parse_starts
    from rlhpo.compare.report import console_table
    from rlhpo.compare.runner import command_line, run_comparison
    from rlhpo.run_folder import RunFolderError
    from rlhpo.tasks import SpecError

    try:
        cfg = CompareConfig(
            out=Path(out),
            methods=parse_methods(methods),
            suite=suite,
            split=split,
            tasks=[t.strip() for t in tasks.split(",") if t.strip()] or None,
            seeds=_seeds(seeds),
            starts=parse_starts(starts),
            budget_scale=budget_scale,
            workers=workers,
            executor=executor,
            address=address or None,
            storage=storage or None,
            use_wandb=not no_wandb,
            bootstrap_reps=bootstrap_reps,
            command=command_line(),
        )
        res = run_comparison(cfg, console=console)
    except (MethodError, CompareError, SpecError, RunFolderError) as e:
        _fail(str(e))
    _show_result(res, console_table)


def _show_result(res, console_table) -> None:
    if res.report is not None and res.report.entries:
        console.print(console_table(res.report, title=f"comparison in {res.out}"))
    console.print(
        f"{res.ran} cells run, {res.skipped} already done, {len(res.failed)} failed, "
        f"{res.wall_time:.0f} s. Summary: {res.summary}; plots: "
        + ", ".join(str(p) for p in res.plots)
    )
    if res.failed:
        for cid, err in res.failed:
            console.print(f"[red]failed[/red] {cid}: {err}", highlight=False)
        raise typer.Exit(code=1)


@app.command()
def demo(
    policy: Annotated[
        str, typer.Option(help="Policy directory or shipped name (default: default).")
    ] = "",
    task: Annotated[str, typer.Option(help="A held-out (test) task.")] = "mnist1d-cnn",
    seeds: Annotated[int, typer.Option(help="Seeds per cell.")] = 2,
    trials: Annotated[int, typer.Option(help="Optuna TPE trials.")] = 6,
    out: Annotated[str, typer.Option(help="Output folder (default runs/demo-TIME).")] = "",
) -> None:
    """The first taste: the shipped policy on a held-out task vs static, plateau and Optuna."""
    from rlhpo.compare import CompareError, MethodError
    from rlhpo.compare.demo import DEFAULT_POLICY, DEMO_SUITE, run_demo
    from rlhpo.compare.report import console_table
    from rlhpo.run_folder import RunFolderError, check_run_folder
    from rlhpo.tasks import SpecError, load_suite

    if seeds < 1:
        _fail(f"--seeds must be >= 1, got {seeds}")
    if trials < 1:
        _fail(f"--trials must be >= 1, got {trials}")
    try:  # before the introduction, so that a bad input is all that is printed
        check_run_folder(out or ".")
    except RunFolderError as e:
        _fail(str(e))
    held_out = [t.name for t in load_suite(DEMO_SUITE).split("test")]
    if task not in held_out:
        _fail(
            f"--task must be a held-out task of suite {DEMO_SUITE!r} ({', '.join(held_out)}), got {task!r}"
        )
    pol = policy or str(DEFAULT_POLICY)
    console.print(
        f"[bold]rlhpo demo[/bold]: policy [cyan]{pol}[/cyan] tunes a run of the held-out task "
        f"[cyan]{task}[/cyan] (from the default start and from lr 1e-5), next to the static "
        f"default, the hand-written plateau controller and Optuna TPE with {trials} trials; "
        f"{seeds} seeds, the same sample budget per run."
    )
    try:
        res = run_demo(
            pol, out or None, task=task, seeds=tuple(range(seeds)), trials=trials, console=console
        )
    except (FileNotFoundError, CompareError, MethodError, SpecError, RunFolderError) as e:
        _fail(str(e))
    _show_result(res, console_table)


@app.command()
def train(
    out: Annotated[str, typer.Option(help="Run directory: log, checkpoint, W&B run, policy/.")],
    agent: Annotated[str, typer.Option(help="ppo, reinforce or vine.")] = "ppo",
    suite: Annotated[
        str, typer.Option(help="Suite name (default, tiny) or path to a TOML file.")
    ] = "default",
    timesteps: Annotated[
        int,
        typer.Option(
            help="Env steps in all (one per interval: 10-50 per episode on the default suite)."
        ),
    ] = 51200,
    seed: Annotated[int, typer.Option(help="Seed of the agent and the envs.")] = 0,
    n_envs: Annotated[
        int | None, typer.Option(help="Parallel envs (PPO; default from the recipe).")
    ] = None,
    resume: Annotated[bool, _flag("--resume", "Continue from DIR's last checkpoint.")] = False,
    no_wandb: Annotated[bool, _flag("--no-wandb", "Log only to DIR/log.jsonl.")] = False,
    recipe: Annotated[
        str | None,
        typer.Option(help="Recipe TOML (default: the shipped rlhpo/recipes/<agent>.toml)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe field: key=value (repeatable)."),
    ] = None,
    executor: Annotated[
        str,
        typer.Option(
            help="local (env shards in processes here) or ray (PPO: the n_procs env shards "
            "as Ray actors; the learner stays here)."
        ),
    ] = "local",
    address: Annotated[
        str, typer.Option(help="Ray cluster address, HOST:PORT (--executor ray).")
    ] = "",
) -> None:
    """Train a tuning policy on a suite's train split; the policy lands in DIR/policy."""
    from pathlib import Path

    from rlhpo.agents import AGENTS, load_settings
    from rlhpo.agents import train as train_agent
    from rlhpo.agents.checkpoint import CHECKPOINT, CheckpointError, has_checkpoint
    from rlhpo.ray_vec_env import ExecutorError
    from rlhpo.run_folder import RunFolderError, RunFolderLock, make_run_folder
    from rlhpo.tasks import SpecError

    if timesteps < 1:
        _fail(f"--timesteps must be >= 1, got {timesteps}")
    if agent not in AGENTS:
        _fail(f"--agent must be one of {', '.join(AGENTS)}, got {agent!r}")
    if executor not in ("local", "ray"):
        _fail(f"--executor must be local or ray, got {executor!r}")
    if address and executor != "ray":
        _fail(
            f"--address applies to --executor ray only, got --address {address} with --executor {executor}"
        )
    if executor == "ray" and agent != "ppo":
        from rlhpo.agents import REINFORCE_LOCAL_ONLY

        _fail(REINFORCE_LOCAL_ONLY.format(executor=executor) + f", got --agent {agent}")
    overrides = list(set_ or [])
    if n_envs is not None:
        if agent != "ppo":
            _fail(
                f"--n-envs applies to ppo only (reinforce and vine run no vector env), "
                f"got --agent {agent}"
            )
        overrides.append(f"n_envs={n_envs}")
    command = " ".join(["rlhpo", *sys.argv[1:]])
    try:
        settings = load_settings(agent, recipe, overrides)
        if agent == "ppo" and not resume:  # a resumed run checks its own settings
            from rlhpo.agents.ppo import check_executor

            check_executor(settings, executor, address or None)
    except (ValueError, SpecError) as e:
        _fail(str(e))
    if address:  # before anything is written: a wrong address costs seconds, not a run folder
        from rlhpo.runtime import probe_ray_address, ray_unreachable_message

        try:
            probe_ray_address(address)
        except ConnectionError as e:
            _fail(ray_unreachable_message(address, e))
    try:
        lock = RunFolderLock(make_run_folder(out), command).acquire()
    except (ValueError, RunFolderError) as e:
        _fail(str(e))
    try:
        if has_checkpoint(out) and not resume:
            _fail(
                f"{out} already holds a training run ({CHECKPOINT}); pass --resume to continue "
                "it or choose another --out"
            )
        info = train_agent(
            agent,
            settings,
            out,
            timesteps=timesteps,
            seed=seed,
            suite=suite,
            resume=resume,
            use_wandb=not no_wandb,
            console=console,
            command=command,
            executor=executor,
            address=address or None,
        )
    except (ValueError, SpecError, CheckpointError, ExecutorError) as e:
        _fail(str(e))
    finally:
        lock.release()
    if info["timesteps"] > timesteps:
        unit = {"ppo": "rollouts (n_steps x n_envs)", "vine": "rounds"}.get(agent, "episodes")
        console.print(
            f"note: trained {info['timesteps']} timesteps for --timesteps {timesteps}: "
            f"{agent} trains in whole {unit}",
            highlight=False,
        )
    console.print(
        f"[green]policy saved[/green] to {Path(out) / 'policy'}: {info['timesteps']} timesteps, "
        f"{info['episodes']} episodes, {info['train_wall_time_s']:.0f} s, "
        f"mean return (last {info['mean_over_episodes']}) {info['mean_return']:+.3f}",
        highlight=False,
    )


policy_app = typer.Typer(no_args_is_help=True, help="Inspect policy files.")
app.add_typer(policy_app, name="policy")


@policy_app.command("info")
def policy_info(
    path: Annotated[
        str,
        typer.Argument(help="Policy directory (manifest.json + weights) or shipped name: default."),
    ],
) -> None:
    """Print a policy's manifest and check its weights against it (shapes, dtypes)."""
    from rlhpo.policy import PolicyFileError, load_policy

    try:
        pol = load_policy(path)
    except PolicyFileError as e:
        # One line, never wrapped, so scripts can grep it.
        msg = str(e).replace("\n", " ")
        console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    m = pol.manifest
    table = Table(title=f"policy {path}", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    skip = {"tensors", "recipe"}
    for k, v in m.items():
        if k in skip:
            continue
        table.add_row(k, v if isinstance(v, str) else json.dumps(v))
    console.print(table)
    if isinstance(m.get("recipe"), dict):
        console.print("recipe: " + json.dumps(m["recipe"]), highlight=False)
    n = sum(t.numel() for t in pol.net.state_dict().values())
    console.print(
        f"[green]weights OK[/green]: {len(m['tensors'])} tensors, {n} values, match the manifest",
        highlight=False,
    )


@app.command("apply")
def apply_cmd(
    policy: Annotated[
        str,
        typer.Option(help="Policy directory (manifest.json + weights) or shipped name: default."),
    ],
    task: Annotated[str, typer.Option(help="Task name in the suite.")],
    suite: Annotated[
        str, typer.Option(help="Suite name (default, tiny) or path to a TOML file.")
    ] = "default",
    seed: Annotated[
        int, typer.Option(help="Run seed (same init and data order as an episode).")
    ] = 0,
    out: Annotated[
        str | None, typer.Option(help="Output folder (default runs/apply/TASK-sSEED-TIME).")
    ] = None,
    start: Annotated[
        str, typer.Option(help="Starting hyperparameters: default, random or low-lr.")
    ] = "default",
    budget_scale: Annotated[float, typer.Option(help="Multiply the task's sample budget.")] = 1.0,
    stochastic: Annotated[
        bool, _flag("--stochastic", "Sample actions instead of the most likely.")
    ] = False,
    no_wandb: Annotated[bool, _flag("--no-wandb", "Log only to OUT/log.jsonl.")] = False,
    vs_static: Annotated[
        bool,
        _flag(
            "--vs-static",
            "Also train the static run from the same start and seed; report both and "
            "the policy run's optimizer steps and wall time relative to it.",
        ),
    ] = False,
) -> None:
    """Train a task for its whole budget with a policy tuning it (a Controller on a Trainee)."""
    from rich.live import Live

    from rlhpo.apply import STARTS, apply_policy
    from rlhpo.policy import PolicyFileError
    from rlhpo.tasks import SpecError

    if start not in STARTS:
        _fail(f"--start must be one of {', '.join(STARTS)}, got {start!r}")
    table = Table(title=f"rlhpo apply: {task}, seed {seed}, start {start}, policy {policy}")
    for col in (
        "interval",
        "samples",
        "lr",
        "batch",
        "dropout",
        "train loss",
        "val loss",
        "val score",
    ):
        table.add_column(col, justify="right")

    # Started at the first row, so that an error in the inputs is printed alone,
    # not after an empty table.
    live = Live(table, console=console, refresh_per_second=4)

    def add_row(r) -> None:
        if not live.is_started:
            live.start()
        table.add_row(
            str(r.interval) + (" [red]rollback[/red]" if r.rolled_back else ""),
            str(r.samples),
            f"{r.lr:.2e}",
            str(r.batch_size),
            f"{r.dropout:.2f}",
            "" if r.train_loss is None else f"{r.train_loss:.4f}",
            f"{r.val_loss:.4f}",
            f"{r.val_score:.4f}",
        )

    try:
        res = apply_policy(
            policy,
            task,
            suite=suite,
            seed=seed,
            start=start,
            budget_scale=budget_scale,
            out_dir=out,
            use_wandb=not no_wandb,
            deterministic=not stochastic,
            on_row=add_row,
            vs_static=vs_static,
        )
    except (PolicyFileError, SpecError, ValueError, OSError) as e:
        if live.is_started:
            live.stop()
            console.line()
        _fail(str(e))
    finally:
        if live.is_started:
            live.stop()
    console.line()  # Live leaves the cursor at the table's last line when piped
    f = res.final
    console.print(
        f"final val {f.val_score:.4f} (loss {f.val_loss:.4f}) | [bold]test {res.test['score']:.4f}[/bold] "
        f"(loss {res.test['loss']:.4f}) | {res.samples} samples | {res.optimizer_steps} optimizer "
        f"steps ({res.static_steps} at the default batch) | training {res.train_seconds:.2f} s, "
        f"controller {1000 * res.controller_seconds:.1f} ms, wall {res.wall_seconds:.2f} s"
        + (f" | {res.rollbacks} rollbacks" if res.rollbacks else ""),
        highlight=False,
    )
    if res.static is not None:
        st = res.static
        console.print(
            f"static run from the same start: test {st['test_score']:.4f} | "
            f"{st['optimizer_steps']} optimizer steps, training {st['train_seconds']:.2f} s | "
            f"policy run: [bold]{st['steps_ratio']:.2f}x the steps, {st['wall_ratio']:.2f}x the "
            f"training wall time[/bold]",
            highlight=False,
        )
    files = ", ".join(f"{k} {v}" for k, v in res.files.items())
    console.print(f"wrote {files}", highlight=False, soft_wrap=True)


def main() -> None:  # pragma: no cover - console entry point
    from rlhpo.runtime import limit_threads

    # The process is rlhpo's own here: one torch thread (see rlhpo.runtime); library
    # calls leave the user's thread setting alone.
    limit_threads()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
