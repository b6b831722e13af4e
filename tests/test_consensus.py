"""Consensus policies (issue #22): an ensemble of bootstrap-fitted nets that moves only
where every member makes the same move, in memory, in its file and through the vine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlhpo.agents.vine import BRANCHES, VineSettings, fit_consensus, read_branches
from rlhpo.policy import ConsensusNet, PolicyFileError, PolicyNet, load_policy, save_policy
from tests.test_policy_window import assert_bad_architecture
from tests.test_vine import _train as _vine_train

KEEP = (2, 1, 1)


def _net(lr_action: int, weight0: float = 0.0) -> PolicyNet:
    """A net whose lr logits prefer ``lr_action``; with ``weight0`` the preference for
    action 4 grows with observation feature 1 (so members can disagree by state)."""
    net = PolicyNet()
    with torch.no_grad():
        net.action_net.weight.zero_()
        net.action_net.bias.zero_()
        net.action_net.bias[lr_action] = 1.0
        net.action_net.bias[5 + 1] = 5.0
        net.action_net.bias[8 + 1] = 5.0
        for layer in net.policy_net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        if weight0:  # feature 1 -> hidden unit 0 -> hidden unit 0 -> lr logit 4
            net.policy_net[0].weight[0, 1] = 1.0
            net.policy_net[2].weight[0, 0] = 1.0
            net.action_net.weight[4, 0] = weight0
    return net


def _obs(frac: float, x: float = 0.0) -> np.ndarray:
    o = np.zeros(PolicyNet().obs_dim, np.float32)
    o[0], o[1] = frac, x
    return o


def test_it_moves_only_where_every_member_makes_the_same_move():
    agree = ConsensusNet([_net(4), _net(4), _net(4)], hold=KEEP)
    assert list(agree.act(_obs(0.3))) == [4, 1, 1]
    split = ConsensusNet([_net(4), _net(4), _net(0)], hold=KEEP)
    assert list(split.act(_obs(0.3))) == list(KEEP)  # one member differs: keep
    # By state: the third member moves to x4 only where feature 1 is large.
    mixed = ConsensusNet([_net(4), _net(4), _net(0, weight0=50.0)], hold=KEEP)
    batch = mixed.act(np.stack([_obs(0.3, 0.0), _obs(0.3, 1.0)]))
    assert batch.tolist() == [list(KEEP), [4, 1, 1]]
    windowed = ConsensusNet([_net(4), _net(4)], hold=KEEP, window=(0.1, 0.5))
    assert windowed.act(np.stack([_obs(0.0), _obs(0.3), _obs(0.9)])).tolist() == [
        list(KEEP),
        [4, 1, 1],
        list(KEEP),
    ]


def test_a_quorum_moves_where_that_many_members_make_the_same_move():
    three = [_net(4), _net(4), _net(4), _net(0), _net(1)]
    assert list(ConsensusNet(three, hold=KEEP, quorum=3).act(_obs(0.3))) == [4, 1, 1]
    assert list(ConsensusNet(three, hold=KEEP, quorum=4).act(_obs(0.3))) == list(KEEP)
    assert list(ConsensusNet(three, hold=KEEP).act(_obs(0.3))) == list(KEEP)  # all: no
    # The majority may sit anywhere among the members, and may differ by state.
    late = [_net(0), _net(1), _net(0, weight0=50.0), _net(0, weight0=50.0), _net(4)]
    batch = ConsensusNet(late, hold=KEEP, quorum=3).act(np.stack([_obs(0.3), _obs(0.3, 1.0)]))
    assert batch.tolist() == [[0, 1, 1], [4, 1, 1]]  # x=0: three pick 0; x=1: three pick 4
    with pytest.raises(PolicyFileError, match="quorum must be more than half of the 5"):
        ConsensusNet(three, hold=KEEP, quorum=2)


def test_a_consensus_travels_in_the_policy_file(tmp_path):
    net = ConsensusNet([_net(4), _net(4), _net(0, weight0=50.0)], hold=KEEP, window=(0.1, 0.6))
    pol = load_policy(save_policy(tmp_path / "p", net, agent="test"))
    assert isinstance(pol.net, ConsensusNet) and len(pol.net.members) == 3
    assert pol.manifest["architecture"]["members"] == 3
    assert sorted(pol.manifest["tensors"])[0].startswith("members.0.")
    obs = np.stack([_obs(f, x) for f in (0.0, 0.3, 0.9) for x in (0.0, 1.0)])
    np.testing.assert_array_equal(pol.act(obs), net.act(obs))
    # What the Controller calls, with its arguments.
    gen = torch.Generator().manual_seed(0)
    assert pol.net.act(obs[1], deterministic=True, generator=gen).tolist() == list(KEEP)
    assert "quorum" not in pol.manifest["architecture"]  # all members: the default
    q = ConsensusNet([_net(4), _net(4), _net(0)], hold=KEEP, quorum=2)
    back = load_policy(save_policy(tmp_path / "q", q, agent="test"))
    assert back.net.quorum == 2 and back.manifest["architecture"]["quorum"] == 2
    assert list(back.act(_obs(0.3))) == [4, 1, 1]


@pytest.mark.parametrize(
    "arch, what",
    [
        ({"members": 1}, "architecture.members must be 2 to 8, got 1"),
        ({"members": 9}, "architecture.members must be 2 to 8, got 9"),
        ({"members": "3"}, "architecture.members must be 2 to 8, got '3'"),
        ({"hold": [9, 1, 1]}, "architecture.hold must be"),
        ({"window": [0.6, 0.1]}, "architecture.window must be"),
        ({"quorum": 1}, "architecture.quorum must be more than half of the 2 members"),
        ({"quorum": 3}, "architecture.quorum must be more than half of the 2 members"),
    ],
)
def test_a_bad_consensus_in_a_policy_file_is_a_one_line_error(tmp_path, arch, what):
    path = save_policy(tmp_path / "p", ConsensusNet([_net(4), _net(0)], hold=KEEP), agent="t")
    assert_bad_architecture(path, arch, what)


def test_members_of_another_architecture_are_refused():
    other = PolicyNet(hidden=(8,))
    with pytest.raises(PolicyFileError, match="members of one architecture"):
        ConsensusNet([_net(4), other], hold=KEEP)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"ensemble": 1}, "ensemble must be 0 (one net) or 2 to 8 members, got 1"),
        ({"ensemble": 9}, "ensemble must be 0 (one net) or 2 to 8 members, got 9"),
        ({"ensemble": True}, "ensemble must be 0 (one net) or 2 to 8 members, got True"),
        ({"ensemble": 3, "rounds": 2}, "ensemble needs rounds = 1"),
        ({"quorum": 3}, "quorum must be 0 (all members) or, with ensemble, more than half"),
        ({"ensemble": 5, "quorum": 2}, "quorum must be 0 (all members) or, with ensemble"),
    ],
)
def test_bad_ensemble_settings_are_one_line_errors(values, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        VineSettings(**values)


def _episode(index: int, frac: float, adv4: float) -> dict:
    """One branched state whose x4 move gains ``adv4`` over keep."""
    return {
        "round": 1,
        "index": index,
        "weight": 1.0,
        "states": [
            {"k": 1, "frac": frac, "obs": _obs(frac, adv4).tolist(), "adv": [0, 0, 0, 0, adv4]}
        ],
    }


def test_the_consensus_window_is_the_members_common_support():
    """A member acts only within its own window, so fit_consensus gives the ensemble
    the windows' intersection: with windowed members, the consensus equals the
    members' vote where each holds outside its own window (what vine_lofo measured)."""
    s = VineSettings(ensemble=4, support_window=True, update_steps=50, curriculum="")
    eps = [_episode(i, 0.05 + 0.4 * i / 11, 0.5 if i % 2 else -0.5) for i in range(12)]
    net = fit_consensus(eps, s, 0, PolicyNet().obs_dim, (5, 3, 3), KEEP, 0)
    assert net.window is not None and 0.05 <= net.window[0] <= net.window[1] <= 0.45
    assert all(m.window is None for m in net.members)
    frac = np.linspace(0, 1, 41)
    obs = np.stack([_obs(f, x) for f in frac for x in (-0.5, 0.5)])
    acts = net.act(obs)
    off = (obs[:, 0] < net.window[0]) | (obs[:, 0] > net.window[1])
    assert (acts[off] == KEEP).all() and off.any() and (~off).any()


def _train(out, extra=()):
    """The vine test's tiny run, as one round of 6 episodes fitting a consensus of 3."""
    one_round = ["--set", "rounds=1", "--set", "episodes_per_round=6", "--set", "ensemble=3"]
    return _vine_train(out, [*one_round, *extra])


def test_a_killed_ensemble_run_resumes_to_the_uninterrupted_policy(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    full = tmp_path / "full"
    subprocess.run(_train(full), check=True, env=env, capture_output=True, timeout=600)
    m_full = json.loads((full / "policy" / "manifest.json").read_text())
    assert m_full["architecture"]["members"] == 3

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        _train(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    path = cut / BRANCHES
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= len(read_branches(path)) < 6
    subprocess.run(_train(cut, ["--resume"]), check=True, env=env, capture_output=True, timeout=600)
    assert len(read_branches(path)) == 6
    # Resuming a finished run refits the same consensus from the same episodes.
    subprocess.run(_train(cut, ["--resume"]), check=True, env=env, capture_output=True, timeout=600)
    a, b = (load_file(d / "policy" / "policy.safetensors") for d in (full, cut))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    m_cut = json.loads((cut / "policy" / "manifest.json").read_text())
    assert m_cut["architecture"] == m_full["architecture"]
    assert m_cut["resumes"] == 2


def test_the_batched_pass_gives_every_members_own_action_and_follows_changed_weights():
    torch.manual_seed(0)
    members = [PolicyNet() for _ in range(5)]
    with torch.no_grad():  # non-trivial normalisation too
        for m in members:
            m.obs_mean.normal_()
            m.obs_std.uniform_(0.5, 2.0)
    net = ConsensusNet(members, hold=KEEP, quorum=3)
    obs = np.random.default_rng(0).normal(size=(2000, members[0].obs_dim)).astype(np.float32)
    own = np.stack([m.act(obs) for m in members])
    assert (net._member_actions(obs) == own).all()
    assert (net._member_actions(obs[:1]) == own[:, :1]).all()  # one observation
    before = net.act(obs[0])
    with torch.no_grad():  # an in-place change (as load_state_dict makes) is seen
        for m in members:
            m.action_net.bias[0] += 100.0
    assert list(net.act(obs[0]))[0] == 0 != before[0]
    for m in members:  # and a replaced tensor
        m.action_net.bias = torch.nn.Parameter(torch.zeros_like(m.action_net.bias))
        m.action_net.weight = torch.nn.Parameter(torch.zeros_like(m.action_net.weight))
    assert list(net.act(obs[0])) == [0, 0, 0]  # all logits equal: argmax is the first
