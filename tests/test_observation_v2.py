"""Observation encoder v2: scale-free response features, versioned next to v1."""

import json

import numpy as np
import pytest
import torch

from rlhpo.controller import Controller, default_space
from rlhpo.env import EnvConfig, HPOEnv
from rlhpo.observation import (
    MetricHistory,
    ObservationEncoder,
    ObservationEncoderV2,
    encoder_class,
    loss_trend,
)
from rlhpo.policy import PolicyFileError, PolicyNet, load_policy, save_policy

# A v1 observation computed by the encoder as it was before v2 existed.
V1_BEFORE_V2 = [
    0.5, 0.3010300099849701, 0.5, -1.0, 0.550000011920929, 0.550000011920929, 1.5, 5.5,
    -0.54522705078125, -0.4964368939399719, -1.592268705368042, -0.8717669248580933,
    0.04879016429185867, 0.0, 0.0, 0.0,
]  # fmt: skip


def _history(lr_factor=1.0, batch_losses=(0.7, 0.6, 0.65, 0.5, 0.45)):
    h = MetricHistory()
    hp = {"lr": 1e-3 * lr_factor, "batch_size": 64, "dropout": 0.1}
    h.record(val_loss=0.69, val_score=0.0, train_loss=None, hp=hp, budget_fraction=0.0)
    hp = {**hp, "lr": 4e-3 * lr_factor}
    h.record(
        val_loss=0.5, val_score=0.4, train_loss=0.55, hp=hp, budget_fraction=0.25,
        batch_losses=batch_losses,
    )  # fmt: skip
    hp = {**hp, "batch_size": 128, "dropout": 0.0}
    h.record(
        val_loss=0.42, val_score=0.55, train_loss=0.4, hp=hp, budget_fraction=0.5,
        batch_losses=batch_losses,
    )  # fmt: skip
    return h


def test_v1_observation_is_bit_identical_to_before_v2():
    obs = ObservationEncoder(default_space()).encode(_history())
    assert obs.dtype == np.float32 and obs.tolist() == V1_BEFORE_V2


def test_loss_trend_is_the_scale_free_slope_and_noise():
    x = np.linspace(0, 1, 9)
    slope, noise = loss_trend(list(3.0 * np.exp(-0.5 * x)))
    assert slope == pytest.approx(-0.5) and noise == pytest.approx(0.0, abs=1e-12)
    # Scale-free: the same curve at 1000x the loss, with noise, reads the same.
    wiggle = np.exp(0.1 * np.array([1, -1] * 4 + [1]))
    a = loss_trend(list(np.exp(-x) * wiggle))
    b = loss_trend(list(1000 * np.exp(-x) * wiggle))
    assert a == pytest.approx(b) and a[1] > 0.05
    assert loss_trend([0.5, 0.4]) == (None, None)
    assert loss_trend([0.5, float("nan"), 0.4]) == (None, None)


def test_v2_reads_the_lr_relative_to_the_start_and_the_response():
    sp = default_space()
    enc = ObservationEncoderV2(sp)
    a, b = enc.encode(_history()), enc.encode(_history(lr_factor=8.0))
    assert a.shape == (ObservationEncoderV2.SIZE,) == (enc.size,) == (21,)
    np.testing.assert_array_equal(a, b)  # no feature tells the absolute lr
    v1a = ObservationEncoder(sp).encode(_history())
    v1b = ObservationEncoder(sp).encode(_history(lr_factor=8.0))
    assert v1a[1] != v1b[1]
    assert a[1] == pytest.approx(0.5)  # log2(4) / 4
    # The lr last changed before interval 1: the response is measured from the start.
    assert a[16] == pytest.approx(10 * 0.55)
    assert a[17] == pytest.approx(np.log(0.4 / 0.69), rel=1e-6)
    assert a[18] == pytest.approx(0.5)
    slope, noise = loss_trend([0.7, 0.6, 0.65, 0.5, 0.45])
    assert a[19] == pytest.approx(5 * slope, rel=1e-6) and a[20] == pytest.approx(10 * noise)
    # Without per-batch losses the trend features are 0, the rest as before.
    c = enc.encode(_history(batch_losses=None))
    assert c[19] == c[20] == 0.0
    np.testing.assert_array_equal(c[:19], a[:19])


def test_encoder_versions_are_checked_with_both_named():
    assert encoder_class(1) is ObservationEncoder and encoder_class(2) is ObservationEncoderV2
    with pytest.raises(ValueError, match=r"encoder v4 is not in this rlhpo \(it has v1, v2, v3\)"):
        encoder_class(4)
    with pytest.raises(ValueError, match=r"obs_version: observation encoder v0 is not"):
        EnvConfig(obs_version=0)
    assert EnvConfig.of(obs_version=2).obs_version == 2


def _v2_policy(path):
    torch.manual_seed(0)
    return save_policy(path, PolicyNet(obs_dim=21), obs_version=2, agent="test")


def test_policy_manifest_records_and_selects_the_encoder(tmp_path):
    pol = load_policy(_v2_policy(tmp_path / "v2"))
    assert pol.obs_version == 2 and pol.manifest["encoder"]["size"] == 21
    ctl = Controller(pol, budget_samples=1000, n_classes=3, batch_size=64, apply=False)
    assert isinstance(ctl.encoder, ObservationEncoderV2)
    d = ctl.start(val_loss=1.1, val_score=0.3)
    assert d.observation.shape == (21,)
    with pytest.raises(ValueError, match="reads 16 features; observation encoder v2 gives 21"):
        save_policy(tmp_path / "bad", PolicyNet(), obs_version=2)


def test_unknown_encoder_version_in_a_manifest_names_both(tmp_path):
    path = _v2_policy(tmp_path / "v9")
    m = json.loads((path / "manifest.json").read_text())
    m["encoder"]["version"] = 9
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PolicyFileError, match=r"needs observation encoder v9, .*has v1, v2") as e:
        load_policy(path)
    assert "\n" not in str(e.value)


def test_v1_policy_with_a_v2_option_names_both(tmp_path):
    torch.manual_seed(0)
    pol = load_policy(save_policy(tmp_path / "v1", PolicyNet(), agent="test"))
    assert pol.obs_version == 1
    with pytest.raises(ValueError, match=r"obs_version=2 needs .* v2; this policy .* with v1"):
        Controller(pol, budget_samples=1000, n_classes=3, batch_size=64, obs_version=2)


def test_v2_env_passes_gymnasium_and_sb3_checkers():
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    kw = {"tasks": ["wine-mlp", "digits-mlp"], "budget_scale": 0.05, "obs_version": 2}
    env = HPOEnv("default-v1", **kw)
    assert env.observation_space.shape == (21,)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(HPOEnv("default-v1", **kw), warn=True)
