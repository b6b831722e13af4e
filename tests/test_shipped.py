"""Data shipped inside the package: suites and policies by name or by path, recipes and
the calibrated warm-up + cosine peak, all found through importlib.resources."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import rlhpo
from rlhpo.agents.recipe import recipes_dir
from rlhpo.baselines.schedules import tuned_file, tuned_peak
from rlhpo.cli import app
from rlhpo.policy import PolicyFileError, PolicyNet, load_policy, read_manifest, save_policy
from rlhpo.shipped import policy_names, policy_path, suite_names
from rlhpo.tasks import SpecError, load_suite

PACKAGE = Path(rlhpo.__file__).resolve().parent


def _inside_package(p: Path) -> bool:
    return p.resolve().is_relative_to(PACKAGE)


def test_suites_by_name_and_by_path():
    assert {"default", "tiny"} <= set(suite_names())
    by_name = load_suite("tiny")
    assert _inside_package(Path(by_name.source))
    by_path = load_suite(str(PACKAGE / "suites" / "tiny.toml"))
    assert by_name.train == by_path.train and by_name.test == by_path.test
    with pytest.raises(
        SpecError, match="unknown suite .nope.; known suites: default, default-v1, finetune, tiny"
    ):
        load_suite("nope")


def test_shipped_policies_by_name(tmp_path, monkeypatch):
    assert {"default", "reinforce"} <= set(policy_names())
    pol = load_policy("default")
    assert _inside_package(pol.path) and pol.path.name == "default"
    assert read_manifest("reinforce")["agent"] == "reinforce"
    with pytest.raises(PolicyFileError, match="no such policy directory.*shipped: default"):
        read_manifest("no-such-policy")
    # A folder that exists wins over a shipped name: ./default means the local one.
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_policy(tmp_path / "default", PolicyNet(), suite="tiny")
    assert policy_path("default") == Path("default")
    assert load_policy("default").manifest["suite"] == "tiny"


def test_recipes_and_calibrated_baselines_live_in_the_package():
    assert _inside_package(recipes_dir())
    assert {p.stem for p in recipes_dir().glob("*.toml")} >= {"ppo", "reinforce"}
    assert _inside_package(tuned_file())
    peak, source = tuned_peak("default")
    assert peak > 0 and "warmup_cosine.json" in source


def test_cli_policy_info_takes_a_shipped_name():
    runner = CliRunner()
    r = runner.invoke(app, ["policy", "info", "default"])
    assert r.exit_code == 0, r.output
    assert "weights OK" in r.output
    r = runner.invoke(app, ["policy", "info", "no-such-policy"])
    assert r.exit_code == 2 and "no-such-policy" in r.output and "default" in r.output
