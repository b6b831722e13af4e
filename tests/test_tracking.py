import json

from rlhpo.tracking import Tracker, wandb_mode


def test_offline_by_default_and_jsonl_always(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    with Tracker(tmp_path, config={"a": 1}) as t:
        t.log({"agent/return": 0.5, "hp/lr": 1e-3}, step=1)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["agent/return"] == 0.5
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_no_wandb_writes_only_jsonl(tmp_path):
    with Tracker(tmp_path, use_wandb=False) as t:
        t.log({"x": 1})
    assert not (tmp_path / "wandb").exists()
    assert (tmp_path / "log.jsonl").read_text().strip()


def test_compare_logs_summary_table_plots_and_the_chosen_trial(tmp_path, monkeypatch):
    from rlhpo.compare.runner import run_comparison
    from tests.test_compare import _config
    from tests.wandb_offline import read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "cmp"
    cfg = _config(
        out,
        "static,optuna-random:3",
        tasks=["bc-mlp"],
        seeds=[1],
        starts=["default"],
        use_wandb=True,
        plots=True,
    )
    res = run_comparison(cfg, show_progress=False)
    assert res.failed == [] and res.plots

    # The Optuna cell's summary shows its pick, not its last trial.
    (cell,) = (out / "runs").glob("optuna-random-3__*/wandb/offline-run-*")
    run = read_run(cell)
    assert len(run.series("trial/trial")) == 3
    row = next(r for r in _rows(out / "results.csv") if r["kind"] == "optuna")
    chosen = json.loads(row["detail"])["chosen_trial"]
    assert chosen != 2, "the pick is the last trial: choose another seed to test this"
    assert run.summary["trial/trial"] == chosen
    assert run.summary["trial/norm_test_score"] == float(row["norm_test_score"])

    # One summary run: the summary as a W&B Table, every plot as a W&B image.
    (summary_dir,) = (out / "runs" / "summary" / "wandb").glob("offline-run-*")
    summary = read_run(summary_dir)
    (table,) = summary.series("summary")
    assert table["_type"] == "table-file" and table["nrows"] == 2
    images = {k: v for row in summary.history for k, v in row.items() if k.startswith("plots/")}
    assert set(images) == {f"plots/{p.stem}" for p in res.plots}
    assert all(v["_type"] == "image-file" for v in images.values())
    assert (summary_dir / "files" / table["path"]).is_file()


def test_apply_logs_its_curves_as_a_wandb_image(tmp_path, monkeypatch):
    from tests.test_controller import _apply_cli
    from tests.wandb_offline import read_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    res = _apply_cli(tmp_path, "--out", str(out))
    assert res.exit_code == 0, res.output
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (curves,) = read_run(run_dir).series("curves")
    assert curves["_type"] == "image-file"
    assert (run_dir / "files" / curves["path"]).read_bytes() == (out / "curves.png").read_bytes()


def _rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))
