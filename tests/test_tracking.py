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
