import json

import numpy as np
import pytest
import torch

from rlhpo.env import HPOEnv, run_seed_for
from rlhpo.policy import (
    PolicyFileError,
    PolicyNet,
    architecture_shapes,
    load_policy,
    save_policy,
)


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
        PolicyFileError,
        match=r"needs observation encoder v99, which this rlhpo lacks \(it has v1, v2",
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
    with pytest.raises(
        PolicyFileError, match="tensor 'action_net.weight' is \\[11, 32\\].*says \\[11, 64\\]"
    ):
        load_policy(path)
    # A manifest that agrees with its architecture but not with the weights file.
    save_policy(path, PolicyNet(hidden=(32,)))
    m = json.loads((path / "manifest.json").read_text())
    m["architecture"]["hidden"] = [16]
    m["tensors"] = {
        k: {"shape": s, "dtype": "float32"}
        for k, s in architecture_shapes(m["architecture"]).items()
    }
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PolicyFileError, match="tensor '.*' is float32\\[.*\\], the manifest says"):
        load_policy(path)


def test_run_seed_for_matches_env():
    env = HPOEnv("default-v1", tasks=["wine-mlp"], budget_scale=0.1)
    from rlhpo.trainees import build_trainee

    env.reset(seed=5, options={"task": "wine-mlp", "start": "default"})
    tr = build_trainee(env.spec_task, seed=run_seed_for(5))
    for a, b in zip(env.trainee.model.parameters(), tr.model.parameters(), strict=True):
        assert torch.equal(a, b)


def _edit_manifest(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda m: m["tensors"].update({"obs_mean": 5}),
            r"tensors\['obs_mean'\] must be an object",
        ),
        (lambda m: m.update(freeze=5), "freeze must be a list of knob names"),
        (lambda m: m.update(freeze=["momentum"]), "freeze must be a list of knob names"),
        (lambda m: m["architecture"].update(hidden=[30_000_000, 64]), r"hidden entries .*4096\]"),
        (lambda m: m["architecture"].update(hidden=[8] * 9), "hidden must be a list of 0 to 8"),
        (lambda m: m["architecture"].update(obs_dim="16"), "obs_dim must be 16"),
        (lambda m: m.update(format_version=True), "format_version True is not supported"),
        (lambda m: m["tensors"]["obs_mean"].update(dtype="object"), "dtype must be one of"),
        (lambda m: m.update(note=[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]), "nested deeper than 16"),
    ],
)
def test_hostile_manifest_is_one_clear_error(saved, edit, message):
    _, path = saved
    _edit_manifest(path, edit)
    with pytest.raises(PolicyFileError, match=message):
        load_policy(path)


def test_deep_and_huge_manifests_fail_fast(saved):
    _, path = saved
    text = (path / "manifest.json").read_text()
    # Deep enough to exhaust json's recursion, still under the size cap.
    (path / "manifest.json").write_text(text[:-2] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(PolicyFileError, match="nested deeper than 16"):
        load_policy(path)
    (path / "manifest.json").write_text(text[:-2] + ', "note": "' + "x" * 2_000_000 + '"}')
    with pytest.raises(PolicyFileError, match="larger than the 1048576 bytes allowed"):
        load_policy(path)


def test_oversized_architecture_is_refused_before_allocation(saved, monkeypatch):
    _, path = saved
    # Consistent manifest (tensors agree with the architecture) of ~25M weights.
    arch = {"obs_dim": 16, "nvec": [5, 3, 3], "hidden": [4096] * 3, "activation": "tanh"}
    shapes = architecture_shapes(arch)

    def edit(m):
        m["architecture"] = arch
        m["tensors"] = {k: {"shape": s, "dtype": "float32"} for k, s in shapes.items()}

    _edit_manifest(path, edit)

    def no_alloc(*a, **k):
        raise AssertionError("PolicyNet built before the size check")

    monkeypatch.setattr("rlhpo.policy.PolicyNet.__init__", no_alloc)
    with pytest.raises(PolicyFileError, match="more than the 16777216 allowed"):
        load_policy(path)
