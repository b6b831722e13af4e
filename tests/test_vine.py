"""The vine agent: its update, its curriculum, its settings and its resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlhpo.agents import load_settings
from rlhpo.agents.vine import (
    BRANCHES,
    Curriculum,
    VineSettings,
    draw_episode,
    load_curriculum,
    new_policy,
    read_branches,
    update,
)

NVEC, NOOP = (5, 3, 3), (2, 1, 1)


def test_the_update_moves_where_a_move_pays_and_keeps_where_moves_are_noise():
    s = VineSettings(update_steps=300, kl_target=10.0, move_cost=0.02)
    net = new_policy(4, NVEC, NOOP, s, seed=0)
    rng = np.random.default_rng(0)
    stuck = rng.normal(size=(60, 4)).astype(np.float32) + np.array([3, 0, 0, 0], np.float32)
    fine = rng.normal(size=(60, 4)).astype(np.float32) - np.array([3, 0, 0, 0], np.float32)
    adv_stuck = np.tile([0.5, 0.2, 0.0, -0.3, -0.5], (60, 1))  # lr x1/4 rescues
    adv_fine = rng.normal(scale=0.01, size=(60, 5))  # moves change nothing but noise
    adv_fine[:, 2] = 0.0
    obs = np.concatenate([stuck, fine])
    adv = np.concatenate([adv_stuck, adv_fine]).astype(np.float32)
    assert (net.act(obs)[:, 0] == 2).all()  # starts as the prior
    stats = update(net, obs, adv, None, lr_dim=0, keep=2, s=s)
    acts = net.act(obs)[:, 0]
    assert (acts[:60] == 0).mean() > 0.9
    assert (acts[60:] == 2).mean() > 0.9
    assert stats["states"] == 120 and 0 < stats["share_moving"] < 1


def test_the_kl_target_stops_a_round_early():
    s = VineSettings(update_steps=300, kl_target=0.01)
    net = new_policy(4, NVEC, NOOP, s, seed=0)
    obs = np.ones((10, 4), np.float32)
    adv = np.tile(np.array([1.0, 0, 0, 0, 0], np.float32), (10, 1))
    stats = update(net, obs, adv, None, lr_dim=0, keep=2, s=s)
    assert stats["steps"] < 300 and stats["kl"] > 0.01


def test_episodes_are_a_pure_function_of_seed_round_and_index():
    s = VineSettings(uniform_share=0.0)
    cur = Curriculum.build(["a", "b"], (0.25, 4.0), 0.0, [("a", 4.0, 1.0), ("b", 0.25, 0.0)])
    draws = [draw_episode(s, 0, 1, i, cur) for i in range(20)]
    assert draws == [draw_episode(s, 0, 1, i, cur) for i in range(20)]
    # All from the one cell with regret: task a, the factor within the bin around 4
    # (the grid is 0.25, 4: bins split at their geometric midpoint, 1).
    assert {d["task"] for d in draws} == {"a"}
    assert all(1.0 <= d["lr_scale"] <= 4.0 for d in draws)
    other = [draw_episode(s, 0, 2, i, cur) for i in range(20)]
    assert [d["env_seed"] for d in other] != [d["env_seed"] for d in draws]


def test_importance_weights_give_back_the_target_distribution():
    rows = [("a", 0.25, 1.0), ("a", 1.0, 0.1), ("b", 4.0, 0.5), ("c", 1.0, 0.0)]
    cur = Curriculum.build(["a", "b", "c"], (0.25, 4.0), 0.3, rows)
    rng = np.random.default_rng(0)
    draws = [cur.draw(rng) for _ in range(40000)]
    w = np.array([cur.weight(t, c) for t, c in draws])
    assert w.max() <= 1 / 0.3 + 1e-9
    share_a = np.mean([t == "a" for t, _ in draws])
    assert share_a > 0.5  # the curriculum over-samples task a ...
    for task in "abc":  # ... the weights give each task its uniform third back
        est = np.mean(w * np.array([t == task for t, _ in draws]))
        assert est == pytest.approx(1 / 3, abs=0.02)
    low = np.mean(w * np.array([c < 0.5 for _, c in draws]))  # P(c < 0.5) = 1/4 (log-uniform)
    assert low == pytest.approx(0.25, abs=0.02)
    assert Curriculum.build(["a"], (1.0, 1.0), 0.3, rows).weight("a", 1.0) == 1.0


def test_unscaled_share_puts_that_mass_of_the_target_at_factor_one():
    rows = [("a", 0.25, 1.0), ("a", 1.0, 0.1), ("b", 4.0, 0.5)]
    cur = Curriculum.build(["a", "b"], (0.25, 4.0), 0.4, rows, unscaled_share=0.5)
    rng = np.random.default_rng(1)
    draws = [cur.draw(rng) for _ in range(40000)]
    w = np.array([cur.weight(t, c) for t, c in draws])
    one = np.array([c == 1.0 for _, c in draws])
    assert one.mean() == pytest.approx(0.4 * 0.5, abs=0.01)  # only the uniform part draws it
    assert w.mean() == pytest.approx(1.0, abs=0.02)
    assert np.mean(w * one) == pytest.approx(0.5, abs=0.02)  # the target's point mass
    low = np.mean(w * np.array([c < 0.5 for _, c in draws]))  # half of log-uniform's 1/4
    assert low == pytest.approx(0.125, abs=0.015)
    # Without it, the draws are exactly those of a recipe that predates the key.
    old = Curriculum.build(["a", "b"], (0.25, 4.0), 0.4, rows)
    r1, r2 = np.random.default_rng(2), np.random.default_rng(2)
    zero = Curriculum.build(["a", "b"], (0.25, 4.0), 0.4, rows, unscaled_share=0.0)
    assert [old.draw(r1) for _ in range(50)] == [zero.draw(r2) for _ in range(50)]


def test_unscaled_share_is_validated():
    with pytest.raises(ValueError, match="unscaled_share must be in"):
        VineSettings(unscaled_share=1.0)
    with pytest.raises(ValueError, match="contains 1"):
        VineSettings(unscaled_share=0.5, lr_scale=(2.0, 4.0))


def test_the_shipped_curriculum_names_train_tasks_only():
    from rlhpo.tasks import load_suite

    suite = load_suite("default")
    train = [t.name for t in suite.split("train")]
    rows = load_curriculum("regret-default.json", train)
    assert rows and {r[0] for r in rows} <= set(train)
    assert load_curriculum("regret-default.json", [t.name for t in suite.split("test")]) == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("move_cost=-0.1", "move_cost must be a finite number >= 0, got -0.1"),
        ("branch_until=0", "branch_until must be in (0, 1], got 0.0"),
        ("uniform_share=1.5", "uniform_share must be in [0, 1], got 1.5"),
        ("episodes_per_round=0", "episodes_per_round must be >= 1, got 0"),
        ("kl_target=nan", "kl_target must be a finite number > 0, got nan"),
        ("workers=0", "workers must be >= 1, got 0"),
        ("hidden=[]", "hidden must be a list of sizes >= 1, got []"),
        ('branch_points="two"', "branch_points must be an integer, got 'two'"),
    ],
)
def test_bad_settings_are_one_line_errors(override, message):
    with pytest.raises(ValueError) as e:
        load_settings("vine", overrides=[override])
    assert str(e.value) == message


def test_a_missing_curriculum_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="curriculum file .*nope.json does not exist"):
        load_curriculum("nope.json", ["a"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": [{"task": "a"}]}')
    with pytest.raises(ValueError, match="curriculum file .*bad.json: expected"):
        load_curriculum(str(bad), ["a"])


def test_a_cut_last_line_is_dropped_and_duplicates_count_once(tmp_path):
    p = tmp_path / BRANCHES
    ep = {"round": 1, "index": 0, "states": [], "steps": 1}
    p.write_text(json.dumps(ep) + "\n" + json.dumps(ep) + "\n" + '{"round": 1, "ind')
    assert read_branches(p) == [ep]
    assert p.read_text().endswith("\n")  # the next append starts a clean line


def _train(out, extra=()):
    return [
        sys.executable,
        "-m",
        "rlhpo.cli",
        "train",
        "--agent",
        "vine",
        "--suite",
        "tiny",
        "--out",
        str(out),
        "--no-wandb",
        "--timesteps",
        "100000",
        "--set",
        "episodes_per_round=4",
        "--set",
        "rounds=2",
        "--set",
        "branch_points=1",
        "--set",
        "workers=1",
        "--set",
        'curriculum=""',
        "--set",
        "support_window=true",  # resumed, the window is rebuilt from the episodes
        "--set",
        "branch_from=1",  # the window then lies inside (0, 0.5]
        "--set",
        "branch_until=0.5",
        "--set",
        "ensemble=0",  # one net over two rounds (the recipe's consensus needs one round)
        "--set",
        "quorum=0",
        *extra,
    ]


def test_kill_during_branch_collection_resumes_to_the_uninterrupted_policy(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    full = tmp_path / "full"
    subprocess.run(_train(full), check=True, env=env, capture_output=True, timeout=600)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        _train(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    path = cut / BRANCHES
    deadline = time.monotonic() + 300
    # Kill once round 2 has started: round 1's update and some of round 2 are behind it.
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and any(
            json.loads(line)["round"] == 2 for line in path.read_text().splitlines()[:-1] if line
        ):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(read_branches(path))
    assert 4 < before < 8
    subprocess.run(_train(cut, ["--resume"]), check=True, env=env, capture_output=True, timeout=600)
    eps = read_branches(path)
    keys = [(e["round"], e["index"]) for e in eps]
    assert sorted(keys) == [(r, i) for r in (1, 2) for i in range(4)]  # none lost, none twice
    assert len(path.read_text().splitlines()) == 8
    a, b = (
        load_file(full / "policy" / "policy.safetensors"),
        load_file(cut / "policy" / "policy.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    m_full, m_cut = (json.loads((d / "policy" / "manifest.json").read_text()) for d in (full, cut))
    assert m_cut["resumes"] == 1
    assert m_full["architecture"]["window"] == m_cut["architecture"]["window"]
    assert 0 < m_cut["architecture"]["window"][0] <= m_cut["architecture"]["window"][1] <= 0.5


def test_a_bad_curriculum_fails_before_the_run_folder_is_made(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        _train(out, ["--set", "curriculum=nope.json"]),  # the last --set wins
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "curriculum file" in r.stderr + r.stdout
    assert not out.exists()
