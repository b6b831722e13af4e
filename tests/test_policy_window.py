"""The policy's support window (issue #22): a net fitted on states from part of the run
keeps outside that part, in memory, in its file and through the vine's fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlhpo.agents.vine import VineSettings, restrict_to_support
from rlhpo.policy import PolicyFileError, PolicyNet, load_policy, save_policy

KEEP = (2, 1, 1)


def _mover() -> PolicyNet:
    """A net that always picks lr x4 (action 4), whatever it sees."""
    net = PolicyNet()
    with torch.no_grad():
        net.action_net.weight.zero_()
        net.action_net.bias.zero_()
        net.action_net.bias[4] = 5.0
        net.action_net.bias[5 + 1] = 5.0
        net.action_net.bias[8 + 1] = 5.0
    return net


def _obs(frac: float) -> np.ndarray:
    o = np.zeros(PolicyNet().obs_dim, np.float32)
    o[0] = frac
    return o


def test_outside_its_window_the_net_keeps():
    net = _mover()
    assert list(net.act(_obs(0.0))) == [4, 1, 1]  # no window: it moves at decision 0 too
    restrict_to_support(net, np.stack([_obs(0.05), _obs(0.3), _obs(0.45)]), KEEP)
    assert net.window == (pytest.approx(0.05), pytest.approx(0.45))
    assert list(net.act(_obs(0.0))) == list(KEEP)  # decision 0: never labelled
    assert list(net.act(_obs(0.9))) == list(KEEP)  # the unbranched second half
    assert list(net.act(_obs(0.2))) == [4, 1, 1]  # inside: the net decides
    batch = net.act(np.stack([_obs(0.0), _obs(0.2), _obs(0.9)]))
    assert batch.tolist() == [list(KEEP), [4, 1, 1], list(KEEP)]


def test_the_window_travels_in_the_policy_file(tmp_path):
    net = _mover()
    restrict_to_support(net, np.stack([_obs(0.1), _obs(0.5)]), KEEP)
    pol = load_policy(save_policy(tmp_path / "p", net, agent="test"))
    assert pol.net.window == (pytest.approx(0.1), pytest.approx(0.5))
    assert list(pol.act(_obs(0.0))) == list(KEEP)
    assert list(pol.act(_obs(0.3))) == [4, 1, 1]
    # A file without a window (every policy before it) acts everywhere, as before.
    old = load_policy(save_policy(tmp_path / "q", _mover(), agent="test"))
    assert old.net.window is None and "window" not in old.manifest["architecture"]


@pytest.mark.parametrize(
    "arch, what",
    [
        ({"window": [0.5, 0.1], "hold": [2, 1, 1]}, "architecture.window must be"),
        ({"window": [0.0, 2.0], "hold": [2, 1, 1]}, "architecture.window must be"),
        ({"window": [0.1, 0.5], "hold": [9, 1, 1]}, "architecture.hold must be"),
        ({"window": [0.1, 0.5]}, "architecture.hold must be"),
        ({"hold": [2, 1, 1]}, "architecture.window must be"),
    ],
)
def test_a_bad_window_in_a_policy_file_is_a_one_line_error(tmp_path, arch, what):
    assert_bad_architecture(save_policy(tmp_path / "p", _mover(), agent="test"), arch, what)


def assert_bad_architecture(path, arch: dict, what: str) -> None:
    """With ``arch`` merged into the saved policy's manifest architecture, loading it is
    a one-line :class:`PolicyFileError` that matches ``what``."""
    m = json.loads((path / "manifest.json").read_text())
    m["architecture"] |= arch
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PolicyFileError, match=what) as e:
        load_policy(path)
    assert "\n" not in str(e.value)


def test_support_window_must_be_a_bool():
    with pytest.raises(ValueError, match="support_window must be true or false"):
        VineSettings(support_window="yes")
