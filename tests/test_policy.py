import json

import numpy as np
import pytest
import torch

from rlhpo.env import HPOEnv, run_seed_for
from rlhpo.policy import PolicyFileError, PolicyNet, load_policy, save_policy


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    net = PolicyNet()
    return net, save_policy(tmp_path / "pol", net, suite="default", agent="test")


def test_save_load_gives_identical_actions(saved):
    net, path = saved
    obs = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    pol = load_policy(path)
    np.testing.assert_array_equal(pol.act(obs), net.act(obs))
    assert pol.manifest["agent"] == "test" and pol.manifest["encoder"]["version"] == 1


def test_refuses_pickle_and_zip(tmp_path, saved):
    f = tmp_path / "model.zip"
    f.write_bytes(b"PK\x03\x04rest-of-an-sb3-zip")
    with pytest.raises(PolicyFileError, match="refusing to load a pickle/zip"):
        load_policy(f)
    _, path = saved
    torch.save({"x": torch.zeros(1)}, path / "policy.safetensors")  # a pickle in disguise
    with pytest.raises(
        PolicyFileError, match="refusing to load a pickle/zip|not a readable safetensors"
    ):
        load_policy(path)


def test_other_versions_are_named(saved):
    _, path = saved
    m = json.loads((path / "manifest.json").read_text())
    m["encoder"]["version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        PolicyFileError, match="encoder version 99 is not supported; this rlhpo needs 1"
    ):
        load_policy(path)


def test_truncated_and_mismatched_weights(saved):
    _, path = saved
    w = path / "policy.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(PolicyFileError, match="not a readable safetensors"):
        load_policy(path)
    save_policy(path, PolicyNet(hidden=(32,)))
    m = json.loads((path / "manifest.json").read_text())
    m["tensors"]["action_net.weight"]["shape"] = [11, 64]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PolicyFileError, match="tensor 'action_net.weight' is float32\\[11, 32\\]"):
        load_policy(path)


def test_run_seed_for_matches_env():
    env = HPOEnv("default-v1", tasks=["wine-mlp"], budget_scale=0.1)
    from rlhpo.trainees import build_trainee

    env.reset(seed=5, options={"task": "wine-mlp", "start": "default"})
    tr = build_trainee(env.spec_task, seed=run_seed_for(5))
    for a, b in zip(env.trainee.model.parameters(), tr.model.parameters(), strict=True):
        assert torch.equal(a, b)
