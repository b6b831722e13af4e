"""`rlhpo compare`: method strings, statistics on known inputs, an end-to-end run on
the tiny suite (policy, baselines, Optuna, parallel workers), resume after a crash,
and the error messages users see."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rlhpo.cli import app
from rlhpo.compare import (
    CellRun,
    CompareConfig,
    CompareError,
    Method,
    MethodError,
    parse_method,
    parse_methods,
    plots,
    report,
    runner,
    stats,
)
from rlhpo.compare import methods as methods_module
from rlhpo.compare.methods import register, resolve, split_methods, start_hp
from rlhpo.compare.runner import run_comparison
from rlhpo.env import HPOEnv
from rlhpo.policy import PolicyNet, load_policy, save_policy
from rlhpo.tasks import load_suite

TINY = "tiny"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_policy(tmp_path_factory.mktemp("pol") / "rand", PolicyNet(), suite="tiny")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- method strings -----------------------------------------------------------


def test_method_strings_parse():
    m = parse_method("policy:rlhpo/policies/default?freeze=batch_size,dropout")
    assert (m.kind, m.policy_dir, m.freeze) == (
        "policy",
        "rlhpo/policies/default",
        ("batch_size", "dropout"),
    )
    assert m.label == "policy:default-freeze-batch_size+dropout"
    assert parse_method("policy:p/x?name=reinforce").label == "reinforce"
    o = parse_method("optuna-random-hyperband:7")
    assert (o.kind, o.sampler, o.pruner, o.n, o.label) == (
        "optuna",
        "random",
        "hyperband",
        7,
        "optuna-random-hyperband:7",
    )
    assert parse_method("optuna-tpe").n == 20 and parse_method("pbt").n == 4
    assert parse_method("static-bs16").batch_size == 16 and parse_method("static-minbs").min_batch
    assert parse_method("warmup-cosine?peak=0.02").peak == 0.02
    assert parse_method("plateau").start_independent is False
    assert (
        parse_method("optuna-tpe:3").start_independent
        and parse_method("warmup-cosine").start_independent
    )
    assert split_methods("policy:d?freeze=batch_size,dropout,static,optuna-tpe:3") == [
        "policy:d?freeze=batch_size,dropout",
        "static",
        "optuna-tpe:3",
    ]


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("optuna-tpe:abc", "'abc'"),
        ("optuna-grid:5", "'grid'"),
        ("optuna-tpe-sometimes:5", "'sometimes'"),
        ("pbt:1", "'1'"),
        ("policy:", "policy:DIR"),
        ("policy:d?freeze=beta3", "'beta3'"),
        ("static?speed=2", "'speed'"),
        ("cosine:3", "'3'"),
        ("gridsearch", "'gridsearch'"),
        ("warmup-cosine?peak=-1", "'-1'"),
        ("plateau?name", "'name'"),
    ],
)
def test_bad_method_strings_name_the_bad_value(text, bad):
    with pytest.raises(MethodError) as e:
        parse_method(text)
    assert bad in str(e.value) and text in str(e.value)


def test_method_checks_against_the_tasks(tmp_path):
    specs = load_suite(TINY).split("test")
    with pytest.raises(MethodError, match="batch size 24 is not in task 'bc-mlp'"):
        resolve(parse_method("static-bs24"), "tiny", specs)
    with pytest.raises(MethodError, match="no such policy directory"):
        resolve(parse_method(f"policy:{tmp_path}/none"), "tiny", specs)
    with pytest.raises(MethodError, match="same name 'static'"):
        parse_methods("static,cosine?name=static")


def test_a_shipped_policy_is_a_method_by_name():
    specs = load_suite(TINY).split("test")
    m = resolve(parse_method("policy:default"), "tiny", specs)
    assert m.label == "policy:default"
    shipped = Path(load_policy("default").path) / "policy.safetensors"
    assert m.fingerprint() == hashlib.sha256(shipped.read_bytes()).hexdigest()


def test_report_plots_and_runner_do_not_branch_on_kind():
    branch = re.compile(r"kind\b[\"'\]]*\s*(==|!=|\bin\b|\bnot in\b)")
    for module in (report, plots, runner):
        src = Path(module.__file__).read_text()
        assert not branch.search(src), f"{module.__name__} branches on a method kind"


# -- a method defined outside the package ---------------------------------------


@dataclass(frozen=True)
class _HalfLr(Method):
    """The start's hyperparameters at half the lr: a method the package does not know."""

    kind: ClassVar[str] = "half-lr"
    syntax: ClassVar[str] = "half-lr"

    @classmethod
    def accepts(cls, base):
        return base == "half-lr"

    @classmethod
    def parse(cls, text):
        return cls(text.raw, text.name or text.base)

    def run(self, cell):
        from rlhpo.baselines import run_single
        from rlhpo.env import run_seed_for

        hp = start_hp(cell.spec, cell.start)
        hp["lr"] /= 2
        return CellRun(run_single(cell.spec, hp, run_seed_for(cell.seed)), detail={"half": 1})

    @classmethod
    def notes(cls, rows):
        return [f"- half-lr ran {len(rows)} cell(s)"] if rows else []


def test_a_new_method_is_one_class_and_a_registration(tmp_path, monkeypatch):
    with pytest.raises(MethodError, match="unknown method 'half-lr'"):
        parse_method("half-lr")
    monkeypatch.setattr(methods_module, "_REGISTRY", dict(methods_module._REGISTRY))
    register(_HalfLr)
    with pytest.raises(ValueError, match="kind 'half-lr' is taken"):
        register(type("Other", (_HalfLr,), {}))
    out = tmp_path / "cmp"
    cfg = _config(
        out, "static,half-lr", tasks=["bc-mlp"], seeds=[0], starts=["default"], plots=True
    )
    res = run_comparison(cfg, show_progress=False)
    assert res.failed == [] and res.ran == 2
    rows = {r["method"]: r for r in _rows(out / "results.csv")}
    assert rows["half-lr"]["kind"] == "half-lr"
    assert float(rows["half-lr"]["final_lr"]) == pytest.approx(
        float(rows["static"]["final_lr"]) / 2
    )
    assert json.loads(rows["half-lr"]["detail"]) == {"half": 1}
    summary = (out / "summary.md").read_text()
    assert "| half-lr | default |" in summary and "- half-lr ran 1 cell(s)" in summary
    assert (out / "score_vs_compute.png").is_file() and (out / "per_task.png").is_file()


# -- statistics ---------------------------------------------------------------


def test_iqm_and_probability_of_improvement_on_known_inputs():
    assert stats.iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)  # mean of 3..6
    assert stats.iqm([0, 0.5, 0.5, 100]) == pytest.approx(0.5)  # the outlier is trimmed
    hi, lo = [[0.9, 0.8], [0.7, 0.9]], [[0.1, 0.2], [0.3, 0.2]]
    assert stats.probability_of_improvement(hi, lo) == 1.0
    assert stats.probability_of_improvement(lo, hi) == 0.0
    assert stats.probability_of_improvement([[0.5, 0.5]], [[0.5, 0.5]]) == 0.5
    # Task 1: 3 of 4 pairs better; task 2: ties count half -> (0.75 + 0.5) / 2.
    assert stats.probability_of_improvement([[1, 3], [2]], [[2, 0], [2]]) == pytest.approx(0.625)
    p, a, b = stats.poi_ci(hi, lo, reps=200)
    assert (p, a, b) == (1.0, 1.0, 1.0)


def test_stratified_bootstrap_matches_a_direct_resampling():
    rng = np.random.default_rng(3)
    by_task = [rng.normal(0.5 + 0.1 * t, 0.1, 6) for t in range(4)]
    p, lo, hi = stats.iqm_ci(by_task, reps=2000, seed=1)
    assert p == pytest.approx(stats.iqm(np.concatenate(by_task)))
    # Resample runs within each task, by hand.
    r = np.random.default_rng(0)
    vals = [stats.iqm(np.concatenate([r.choice(g, len(g)) for g in by_task])) for _ in range(2000)]
    want = np.percentile(vals, [2.5, 97.5])
    assert lo < p < hi
    assert (lo, hi) == pytest.approx(tuple(want), abs=0.015)
    # One run per task: no interval to give.
    assert math.isnan(stats.iqm_ci([[0.1], [0.2]])[1])


def test_mean_ranks():
    overall, by_task = stats.mean_ranks(
        {
            "a": {("t1", 0): 0.9, ("t1", 1): 0.5, ("t2", 0): 0.3},
            "b": {("t1", 0): 0.1, ("t1", 1): 0.5, ("t2", 0): 0.4},
        }
    )
    assert by_task["a"] == {"t1": 1.25, "t2": 2.0}
    assert overall == {"a": pytest.approx(1.5), "b": pytest.approx(1.5)}


# -- end to end ---------------------------------------------------------------

METHODS = "static,static-minbs,cosine,warmup-cosine?peak=0.01,plateau,optuna-tpe:3"


def _config(out: Path, methods: str, **kw) -> CompareConfig:
    base = dict(
        out=out,
        methods=parse_methods(methods),
        suite=TINY,
        split="test",
        seeds=[0, 1],
        starts=["default", "low-lr"],
        workers=1,
        use_wandb=False,
        bootstrap_reps=200,
        plots=False,
    )
    base.update(kw)
    return CompareConfig(**base)


def test_compare_end_to_end(tmp_path, policy_dir):
    out = tmp_path / "cmp"
    cfg = _config(
        out, f"policy:{policy_dir}?name=pol," + METHODS, workers=2, command="test", plots=True
    )
    res = run_comparison(cfg, show_progress=False)
    assert res.failed == []
    # 5 single-run methods x 2 starts + warmup-cosine + optuna, x 2 tasks x 2 seeds
    n_cells = (5 * 2 + 2) * 2 * 2
    assert (res.ran, res.skipped) == (n_cells, 0)
    rows = _rows(out / "results.csv")
    assert len(rows) == n_cells
    specs = {s.name: s for s in load_suite(TINY).split("test")}
    for r in rows:
        budget = specs[r["task"]].budget_samples
        runs = 3 if r["kind"] == "optuna" else 1
        assert int(r["samples"]) == runs * budget == int(r["runs"]) * budget
        assert float(r["wall_time"]) > 0 and float(r["compute_ratio"]) > 0
        assert r["start"] == ("any" if r["kind"] in ("optuna", "warmup-cosine") else r["start"])
        if (r["method"], r["start"]) == ("static", "default"):
            assert float(r["compute_ratio"]) == 1.0
        if r["method"] == "static-minbs":
            assert r["final_batch_size"] == "16" and float(r["steps_ratio"]) > 3
    # The policy ran through HPOEnv: replaying the episode gives the same result.
    pol = next(r for r in rows if r["method"] == "pol" and r["start"] == "low-lr")
    env = HPOEnv(load_suite(TINY), split="test")
    p = load_policy(policy_dir)
    obs, info = env.reset(
        seed=int(pol["seed"]),
        options={"task": pol["task"], "hp": {"lr": 1e-5, "batch_size": 64, "dropout": 0.1}},
    )
    done = False
    while not done:
        obs, _, done, _, info = env.step(p.act(obs))
    assert float(pol["norm_val_score"]) == pytest.approx(info["val_norm_score"])
    assert float(pol["test_score"]) == pytest.approx(env.test_score()["score"])
    # Traces: one row per interval (plus the start) for every cell; trials for Optuna.
    traces = _rows(out / "traces.csv")
    per_cell = {}
    for t in traces:
        k = (t["method"], t["task"], t["seed"], t["start"])
        per_cell[k] = per_cell.get(k, 0) + 1
    assert len(per_cell) == n_cells and set(per_cell.values()) == {5}
    trials = _rows(out / "trials.csv")
    assert len(trials) == 3 * 2 * 2 and {t["state"] for t in trials} == {"COMPLETE"}
    summary = (out / "summary.md").read_text()
    for label in ("pol", "static-minbs", "warmup-cosine", "plateau", "optuna-tpe:3"):
        assert f"| {label} |" in summary
    for section in (
        "IQM [95% CI]",
        "P(> static)",
        "intervals to target",
        "## Cost",
        "Command: `test`",
    ):
        assert section in summary
    for png in (
        "score_vs_compute",
        "per_task",
        "learning_curves_default",
        "learning_curves_low-lr",
    ):
        assert (out / f"{png}.png").stat().st_size > 10_000
    assert (out / "studies").is_dir() and (out / "runs").is_dir()
    assert json.loads((out / "compare.json").read_text())["sessions"][0]["cells_run"] == n_cells


def test_resume_after_a_crash_skips_finished_cells(tmp_path):
    out = tmp_path / "cmp"
    methods = "static,plateau,optuna-tpe:2"
    cfg = _config(out, methods, tasks=["bc-mlp"])
    full = run_comparison(cfg, show_progress=False)
    assert full.ran == 10 and full.failed == []  # (static, plateau) x 2 starts + optuna, x 2 seeds
    before = _rows(out / "results.csv")
    # Simulate a kill: keep 3 finished cells and a torn half-written row.
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text("".join(lines[:4]) + lines[4][:25])
    kept = {(r["method"], r["seed"], r["start"]) for r in before[:3]}
    traces = (out / "traces.csv").read_text().splitlines(keepends=True)
    # traces.csv still holds the rows of all 10 cells (7 now unfinished) and a torn line
    (out / "traces.csv").write_text("".join(traces) + traces[-1][:10])
    again = run_comparison(cfg, show_progress=False)
    assert (again.ran, again.skipped) == (7, 3)
    after = _rows(out / "results.csv")
    assert len(after) == 10
    assert {(r["method"], r["seed"], r["start"]) for r in after} == {
        (r["method"], r["seed"], r["start"]) for r in before
    }
    for r in after:  # deterministic methods give the same scores when rerun
        twin = next(
            b
            for b in before
            if (b["method"], b["seed"], b["start"]) == (r["method"], r["seed"], r["start"])
        )
        assert float(r["norm_test_score"]) == pytest.approx(float(twin["norm_test_score"]))
    counts = {}
    for t in _rows(out / "traces.csv"):
        k = (t["method"], t["seed"], t["start"])
        counts[k] = counts.get(k, 0) + 1
    assert set(counts.values()) == {5}
    assert kept <= set(counts)
    # A third run has nothing left to do.
    third = run_comparison(cfg, show_progress=False)
    assert (third.ran, third.skipped) == (0, 10)
    assert len(json.loads((out / "compare.json").read_text())["sessions"]) == 3


def test_an_output_folder_of_another_setup_is_refused(tmp_path):
    out = tmp_path / "cmp"
    one = dict(tasks=["bc-mlp"], seeds=[0], starts=["default"])
    run_comparison(_config(out, "static,cosine?name=sched", **one), show_progress=False)
    before = (out / "results.csv").read_text()
    with pytest.raises(CompareError, match="budget_scale 1.0.*0.5"):
        run_comparison(_config(out, "static", budget_scale=0.5, **one), show_progress=False)
    with pytest.raises(
        CompareError, match="'sched' meant 'cosine\\?name=sched'.*'step\\?name=sched'"
    ):
        run_comparison(_config(out, "static,step?name=sched", **one), show_progress=False)
    assert (out / "results.csv").read_text() == before  # nothing written is lost


def test_a_changed_policy_under_the_same_name_is_refused(tmp_path):
    """Resuming must not mix two policies' cells under one method name."""
    torch.manual_seed(1)
    pol = save_policy(tmp_path / "pol", PolicyNet(), suite="tiny")
    out, one = tmp_path / "cmp", dict(tasks=["bc-mlp"], seeds=[0], starts=["default"])
    methods = f"policy:{pol}?name=mine"
    run_comparison(_config(out, methods, **one), show_progress=False)
    meta = json.loads((out / "compare.json").read_text())
    assert len(meta["policy_sha256"]["mine"]) == 64
    again = run_comparison(_config(out, methods, **one), show_progress=False)
    assert again.ran == 0  # same weights: resumes
    before = (out / "results.csv").read_text()
    torch.manual_seed(2)
    save_policy(tmp_path / "pol", PolicyNet(), suite="tiny")  # retrained in place
    with pytest.raises(
        CompareError, match="the policy of method 'mine'.*changed since its cells ran"
    ):
        run_comparison(_config(out, methods, **one), show_progress=False)
    assert (out / "results.csv").read_text() == before


def test_a_moved_policy_resumes_under_its_name(tmp_path, policy_dir):
    """The shipped policies moved into the package: a comparison that named one by its
    old path resumes when it is named by its new one (same weights, same freeze)."""
    out, one = tmp_path / "cmp", dict(tasks=["bc-mlp"], seeds=[0], starts=["default"])
    run_comparison(_config(out, f"policy:{policy_dir}?name=mine", **one), show_progress=False)
    moved = tmp_path / "moved" / "rand"
    shutil.copytree(policy_dir, moved)
    again = run_comparison(_config(out, f"policy:{moved}?name=mine", **one), show_progress=False)
    assert (again.ran, again.skipped) == (0, 2)
    with pytest.raises(CompareError, match="'mine' meant"):
        run_comparison(
            _config(out, f"policy:{moved}?freeze=dropout&name=mine", **one), show_progress=False
        )


def test_wandb_runs_are_written_offline_per_cell(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "cmp"
    res = run_comparison(
        _config(out, "static", tasks=["bc-mlp"], seeds=[0], starts=["default"], use_wandb=True),
        show_progress=False,
    )
    assert res.ran == 1
    run = out / "runs" / "static__bc-mlp__s0__default"
    assert (run / "log.jsonl").is_file()
    assert list((run / "wandb").glob("offline-run-*"))
    logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert logged[0]["config"]["method"] == "static" and logged[0]["config"]["task"] == "bc-mlp"
    assert any("val/norm_score" in x for x in logged)


def test_cli_compare_and_demo_errors_name_the_bad_value(tmp_path):
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "compare",
            "--suite",
            TINY,
            "--methods",
            "static,optuna-tpe:x",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 2 and "'x'" in r.output
    r = runner.invoke(
        app, ["compare", "--suite", TINY, "--seeds", "two", "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 2 and "'two'" in r.output
    r = runner.invoke(app, ["demo", "--policy", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "nope" in r.output and "missing" in r.output
    assert not (tmp_path / "o").exists()


def test_cli_compare_runs(tmp_path, policy_dir):
    out = tmp_path / "o"
    r = CliRunner().invoke(
        app,
        [
            "compare",
            "--suite",
            TINY,
            "--tasks",
            "friedman-mlp",
            "--seeds",
            "0,3",
            "--starts",
            "default",
            "--methods",
            f"policy:{policy_dir}?freeze=batch_size,dropout,static",
            "--out",
            str(out),
            "--workers",
            "1",
            "--no-wandb",
            "--bootstrap-reps",
            "100",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = _rows(out / "results.csv")
    assert {r["seed"] for r in rows} == {"0", "3"}
    frozen = [r for r in rows if r["kind"] == "policy"]
    # Frozen knobs keep their start values whatever the policy says.
    assert {(r["final_batch_size"], r["final_dropout"]) for r in frozen} == {("64", "0.1")}
    assert "policy:rand-freeze-batch_size+dropout" in {r["method"] for r in rows}


@pytest.mark.slow
def test_killed_compare_process_resumes(tmp_path):
    out = tmp_path / "cmp"
    cmd = [
        sys.executable,
        "-m",
        "rlhpo.cli",
        "compare",
        "--suite",
        TINY,
        "--split",
        "test",
        "--methods",
        "static,plateau,cosine,optuna-tpe:4",
        "--seeds",
        "4",
        "--out",
        str(out),
        "--workers",
        "2",
        "--no-wandb",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120:
        p = out / "results.csv"
        if p.exists() and len(p.read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    partial = len(_rows(out / "results.csv"))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows(out / "results.csv")
    total = (3 * 2 + 1) * 2 * 4
    assert len(rows) == total and partial < total
    assert len({(r["method"], r["task"], r["seed"], r["start"]) for r in rows}) == total


@pytest.mark.slow
def test_compare_with_pbt_and_the_ray_executor(tmp_path):
    out = tmp_path / "cmp"
    cfg = _config(
        out, "static,pbt:2", tasks=["bc-mlp"], seeds=[0], starts=["default"], executor="ray"
    )
    res = run_comparison(cfg, show_progress=False)
    assert res.failed == [] and res.ran == 2
    rows = {r["method"]: r for r in _rows(out / "results.csv")}
    assert int(rows["pbt:2"]["samples"]) == 2 * int(rows["pbt:2"]["budget_samples"])
    assert len([t for t in _rows(out / "trials.csv") if t["state"] == "MEMBER"]) == 2


def _study_trials(db: Path) -> dict[str, int]:
    import optuna

    url = f"sqlite:///{db}"
    return {
        s.study_name: len(optuna.load_study(study_name=s.study_name, storage=url).trials)
        for s in optuna.get_all_study_summaries(url)
    }


def test_resume_deduplicates_traces_and_trials(tmp_path):
    out = tmp_path / "cmp"
    cfg = _config(out, "static,optuna-tpe:2", tasks=["bc-mlp"], seeds=[0], starts=["default"])
    run_comparison(cfg, show_progress=False)
    files = {n: (out / n).read_text() for n in ("results.csv", "traces.csv", "trials.csv")}
    for name, text in files.items():  # a cell written twice, e.g. by two processes
        body = text.splitlines(keepends=True)[1:]
        (out / name).write_text(text + "".join(body))
    again = run_comparison(cfg, show_progress=False)
    assert (again.ran, again.skipped) == (0, 2)
    for name, text in files.items():
        assert (out / name).read_text() == text, name


def test_a_moved_comparison_resumes_its_studies(tmp_path):
    one = dict(tasks=["bc-mlp"], seeds=[0], starts=["default"])
    out = tmp_path / "cmp"
    run_comparison(_config(out, "static,optuna-tpe:2", **one), show_progress=False)
    moved = tmp_path / "renamed"
    out.rename(moved)
    # The study finished but its results row was lost (killed before it was written).
    lines = (moved / "results.csv").read_text().splitlines(keepends=True)
    (moved / "results.csv").write_text("".join(line for line in lines if "optuna" not in line))
    again = run_comparison(_config(moved, "static,optuna-tpe:2", **one), show_progress=False)
    assert again.ran == 1
    (db,) = (moved / "studies").glob("*.db")
    assert list(_study_trials(db).values()) == [2]  # the same study, not a second one


def test_same_basename_other_budget_on_a_shared_storage_gets_its_own_studies(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    one = dict(tasks=["bc-mlp"], seeds=[0], starts=["default"], storage=storage)
    a = run_comparison(
        _config(tmp_path / "a" / "cmp", "static,optuna-tpe:2", **one), show_progress=False
    )
    b = run_comparison(
        _config(tmp_path / "b" / "cmp", "static,optuna-tpe:2", budget_scale=0.5, **one),
        show_progress=False,
    )
    assert a.ran == b.ran == 2
    assert list(_study_trials(tmp_path / "shared.db").values()) == [2, 2]
    rows = [r for r in _rows(tmp_path / "b" / "cmp" / "results.csv") if r["kind"] == "optuna"]
    assert float(rows[0]["samples_ratio"]) == pytest.approx(2.0)  # its own 2 trials
