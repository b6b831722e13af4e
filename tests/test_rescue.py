"""The hand-written rescue rule and its compare method."""

import numpy as np
import pytest

from rlhpo.baselines.rescue import RescueRule, rescue_rule
from rlhpo.compare.methods import parse_method
from rlhpo.observation import ObservationEncoderV3 as V3

DOWN, KEEP = (0, 1, 1), (2, 1, 1)


def _obs(at_chance, level_ratio):
    o = np.zeros(V3.SIZE, np.float32)
    o[V3.AT_CHANCE] = at_chance
    o[V3.LR_REL] = np.log2(level_ratio) / 4
    return o


@pytest.mark.parametrize(
    "at_chance, level_ratio, action",
    [
        (0.0, 1.0, KEEP),  # learning: the prior's schedule
        (0.1, 1.0, KEEP),  # at chance, but not for long yet
        (0.2, 1.0, DOWN),  # at chance for a fifth of the budget: lower the lr
        (0.3, 0.25, DOWN),  # still at chance after one move: lower again
        (0.5, 1 / 16, KEEP),  # at the floor: nothing more to try
    ],
)
def test_the_rule_lowers_the_lr_of_a_run_still_at_chance(at_chance, level_ratio, action):
    assert tuple(RescueRule().act(_obs(at_chance, level_ratio))) == action


def test_the_rule_needs_observation_v3_and_sane_settings():
    with pytest.raises(ValueError, match="reads observation v3 \\(23 features\\), got 21"):
        RescueRule().act(np.zeros(21))
    with pytest.raises(ValueError, match=r"rescue floor must be in \(0, 1\), got 2"):
        RescueRule(floor=2)
    r = rescue_rule()
    assert r.env_overrides()["obs_version"] == 3 and r.collapse_k == 3.0


def test_rescue_is_a_compare_method_with_checked_options():
    m = parse_method("rescue?after=0.3")
    assert m.kind == "rescue" and m.after == 0.3 and m.label == "rescue"
    with pytest.raises(ValueError, match=r"method 'rescue\?after=1.5': rescue after must be in"):
        parse_method("rescue?after=1.5")
    with pytest.raises(ValueError, match="unknown option"):
        parse_method("rescue?bogus=1")


def test_policy_cells_count_the_decisions_that_left_keep(tmp_path):
    import json

    import torch

    from rlhpo.compare.runner import run_comparison
    from rlhpo.policy import PolicyNet, save_policy
    from tests.test_compare import _config, _rows

    net = PolicyNet()
    with torch.no_grad():  # lr x1/2 at every decision, nothing else
        net.action_net.weight.zero_()
        net.action_net.bias.copy_(torch.tensor([0, 9.0, 0, 0, 0, 0, 9.0, 0, 0, 9.0, 0]))
    pol = save_policy(tmp_path / "halve", net, suite="tiny", agent="test")
    out = tmp_path / "cmp"
    cfg = _config(out, f"policy:{pol},rescue", tasks=["bc-mlp"], seeds=[0], starts=["default"])
    assert run_comparison(cfg, show_progress=False).failed == []
    detail = {r["method"]: json.loads(r["detail"]) for r in _rows(out / "results.csv")}
    halve = detail["policy:halve"]
    assert halve["moves"] == halve["decisions"] == 4
    assert detail["rescue"]["decisions"] == 4 and detail["rescue"]["moves"] == 0
