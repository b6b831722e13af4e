"""Env state save/restore, branch rollouts with common random numbers, observation v3."""

import numpy as np
import pytest

from rlhpo.branching import branch
from rlhpo.env import HPOEnv
from rlhpo.observation import (
    CHANCE_BAND,
    MetricHistory,
    ObservationEncoderV3,
    encoder_class,
    stuck_fractions,
)
from tests.conftest import BASE_TASK

NOOP = (2, 1, 1)


def _env(**kw):
    kw = {"tasks": ["digits-mlp"], "budget_scale": 0.1, **kw}
    return HPOEnv("default-v1", **kw)


def _rollout(env, first, follow=NOOP):
    obs, r, term, trunc, info = env.step(first)
    trace, ret = [obs], r
    while not (term or trunc):
        obs, r, term, trunc, info = env.step(follow)
        trace.append(obs)
        ret += r
    return np.array(trace), ret, info


@pytest.mark.parametrize(
    "kw",
    [{}, {"collapse_k": 3.0, "base_schedule": "warmup-cosine", "obs_version": 3}],
    ids=["plain", "guard+residual"],
)
def test_load_state_replays_the_same_future(kw):
    env = _env(**kw)
    env.reset(seed=3, options={"task": "digits-mlp", "start": "default"})
    env.step((3, 1, 1))
    state = env.save_state()
    t1, r1, i1 = _rollout(env, (1, 1, 1))
    env.load_state(state)
    t2, r2, i2 = _rollout(env, (1, 1, 1))
    np.testing.assert_array_equal(t1, t2)
    assert r1 == r2 and i1 == i2


def test_branches_share_random_numbers_and_leave_the_env_where_it_was():
    env = _env(obs_version=3, base_schedule="warmup-cosine", collapse_k=3.0)
    env.reset(seed=1, options={"task": "digits-mlp", "start": "default"})
    env.step(NOOP)
    before = env.save_state()
    bs = branch(env, [(0, 1, 1), NOOP, (4, 1, 1)])
    assert [b.action for b in bs] == [(0, 1, 1), NOOP, (4, 1, 1)]
    assert all(b.steps == bs[0].steps for b in bs)
    # The env is back: its own continuation with "keep" is the keep branch, exactly.
    assert env.trainee.samples_seen == before["samples_seen"]
    trace, ret, info = _rollout(env, NOOP)
    assert ret == pytest.approx(bs[1].ret, abs=1e-12)
    assert info["val_norm_score"] == bs[1].final
    # A different first move changes the outcome (the branches are not one run).
    assert len({b.final for b in bs}) > 1


def test_a_diverging_branch_scores_its_penalty_and_never_raises(write_suite):
    text = BASE_TASK.replace("lr = [1e-5, 1e-1]", "lr = [1e-5, 10.0]").replace(
        'metric = "accuracy"', 'metric = "accuracy"\noptimizer = "sgd"'
    )
    env = HPOEnv(write_suite(text), divergence_penalty=0.5)
    env.reset(seed=0, options={"hp": {"lr": 2.5, "batch_size": 16}})
    bs = branch(env, [(4, 1, 1), (0, 1, 1)])  # lr 10: diverges; lr 0.6: may not
    assert bs[0].diverged and bs[0].final == 0.0 and bs[0].ret <= -0.5
    assert env.interval == 0 and env.trainee.samples_seen == 0


def test_a_finished_episode_cannot_be_branched():
    env = _env()
    env.reset(seed=0, options={"task": "digits-mlp"})
    _rollout(env, NOOP)
    with pytest.raises(ValueError, match="cannot branch a finished episode"):
        branch(env, [NOOP])


def test_reset_pins_the_lr_factor_and_names_a_bad_one():
    env = _env(lr_scale=(0.25, 4.0))
    _, info = env.reset(seed=0, options={"task": "digits-mlp", "lr_scale": 2.0})
    assert info["lr_scale"] == 2.0
    for bad in (0, -1.0, float("nan"), "2", True):
        with pytest.raises(ValueError, match=r"options\['lr_scale'\] must be a finite number > 0"):
            env.reset(seed=0, options={"lr_scale": bad})


def _history(scores, losses, ref=2.3):
    h = MetricHistory()
    h.record(
        val_loss=ref,
        val_score=scores[0],
        train_loss=None,
        hp={"lr": 1e-3, "batch_size": 64, "dropout": 0.1},
        budget_fraction=0.0,
    )
    for i, (s, tl) in enumerate(zip(scores[1:], losses, strict=True), 1):
        h.record(
            val_loss=ref,
            val_score=s,
            train_loss=tl,
            hp={"lr": 1e-3, "batch_size": 64, "dropout": 0.1},
            budget_fraction=0.1 * i,
        )
    return h


def test_stuck_features_count_the_budget_spent_without_learning():
    # At chance and a loss that wobbles around its start: stuck on both counts.
    assert stuck_fractions(_history([0.0, 0.02, -0.01, 0.03], [2.35, 2.28, 2.31])) == (
        pytest.approx(0.3),
        pytest.approx(0.3),
    )
    # One score clearly above chance, one loss clearly below the start: not stuck.
    at, flat = stuck_fractions(_history([0.0, CHANCE_BAND + 0.05, 0.0], [2.3, 2.0]))
    assert (at, flat) == (0.0, 0.0)


def test_observation_v3_is_v2_plus_the_stuck_features():
    env = _env(obs_version=3)
    assert encoder_class(3) is ObservationEncoderV3
    assert env.observation_space.shape == (23,)
    obs, _ = env.reset(seed=0, options={"task": "digits-mlp"})
    env2 = _env(obs_version=2)
    obs2, _ = env2.reset(seed=0, options={"task": "digits-mlp"})
    np.testing.assert_array_equal(obs[:21], obs2)
    o3, *_ = env.step(NOOP)
    o2, *_ = env2.step(NOOP)
    np.testing.assert_array_equal(o3[:21], o2)
    np.testing.assert_allclose(o3[21:], stuck_fractions(env.history), rtol=1e-6)
    assert o3[21] > 0  # digits at a tenth of the budget and lr 1e-3: still near chance


def test_env_with_observation_v3_passes_both_checkers():
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = _env(obs_version=3, base_schedule="warmup-cosine", collapse_k=3.0, budget_scale=0.05)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)
