import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

from rlhpo.actions import ActionCodec
from rlhpo.env import ENV_ID, HPOEnv
from tests.conftest import BASE_TASK


def test_registered_and_passes_gymnasium_checker():
    assert ENV_ID in gym.registry
    env = gym.make(
        ENV_ID,
        suite="default-v1",
        split="train",
        tasks=["digits-mlp", "wine-mlp"],
        budget_scale=0.05,
    )
    gym_check_env(env.unwrapped, skip_render_check=True)


def test_passes_sb3_checker():
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = HPOEnv("default-v1", tasks=["breast_cancer-mlp", "regression-mlp"], budget_scale=0.05)
    sb3_check_env(env, warn=True)


def _episode(env, seed, task, actions_seed=0):
    rng = np.random.default_rng(actions_seed)
    obs, info = env.reset(seed=seed, options={"task": task})
    out = [obs]
    rews = []
    done = False
    while not done:
        a = rng.integers(0, ActionCodec.NVEC)
        obs, r, term, trunc, info = env.step(a)
        out.append(obs)
        rews.append(r)
        done = term or trunc
    return np.array(out), np.array(rews), info


@pytest.mark.parametrize("task", ["digits-mlp", "mnist1d-cnn", "seq-transformer"])
def test_same_seed_same_episode(task):
    env = HPOEnv("default-v1", split="all", tasks=[task], budget_scale=0.05)
    o1, r1, i1 = _episode(env, 7, task)
    o2, r2, i2 = _episode(
        HPOEnv("default-v1", split="all", tasks=[task], budget_scale=0.05), 7, task
    )
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(r1, r2)
    o3, _, _ = _episode(env, 8, task)
    assert not np.array_equal(o1[0], o3[0]) or not np.array_equal(o1, o3)


def test_random_episode_on_every_task(suite):
    env = HPOEnv(suite, split="all", budget_scale=0.02)
    for i, name in enumerate(env.task_names):
        obs, rews, info = _episode(env, i, name, actions_seed=i)
        assert env.observation_space.contains(obs[-1].astype(np.float32))
        assert info["task"] == name
        assert info["diverged"] or info["samples"] == env.tasks[name].budget_samples
        assert len(rews) <= env.tasks[name].intervals
        assert np.all(np.isfinite(rews))


def test_return_is_final_minus_initial_score_and_info_is_complete():
    env = HPOEnv("default-v1", tasks=["digits-mlp"], budget_scale=0.1, compute_penalty=0.0)
    obs, info0 = env.reset(seed=1, options={"task": "digits-mlp", "start": "default"})
    ret, done = 0.0, False
    while not done:
        obs, r, term, trunc, info = env.step(ActionCodec.NOOP)
        ret += r
        done = term or trunc
    assert ret == pytest.approx(info["val_norm_score"] - info0["val_norm_score"], abs=1e-6)
    for key in ("hp", "val_loss", "val_score", "train_loss", "samples", "optimizer_steps", "task"):
        assert key in info
    assert info["optimizer_steps"] == info["static_steps"]  # default batch size all along


def test_small_batches_pay_a_compute_charge():
    env = HPOEnv("default-v1", tasks=["digits-mlp"], compute_penalty=0.5)
    env.reset(seed=0, options={"hp": {"batch_size": 32}})
    _, _, _, _, info = env.step((2, 0, 1))  # batch 32 -> 16: 4x the default's steps
    assert info["hp"]["batch_size"] == 16
    assert info["compute_charge"] == pytest.approx(0.5 * 3 / env.spec_task.intervals, rel=0.05)


def test_divergence_terminates_with_a_penalty_and_never_raises(write_suite):
    text = (
        BASE_TASK.replace("lr = [1e-5, 1e-1]", "lr = [1e-5, 10.0]")
        .replace('optimizer = "adam"', "")
        .replace('metric = "accuracy"', 'metric = "accuracy"\noptimizer = "sgd"')
    )
    env = HPOEnv(write_suite(text), budget_scale=1.0, divergence_penalty=0.5)
    env.reset(seed=0, options={"hp": {"lr": 10.0, "batch_size": 16}})
    obs, r, term, trunc, info = env.step(ActionCodec.NOOP)
    assert info["diverged"] and term
    assert r <= -0.5
    assert np.all(np.isfinite(obs))


def test_test_split_never_reaches_observation_or_reward(monkeypatch):
    from rlhpo.trainees.trainee import Trainee

    seen = []
    orig = Trainee.evaluate
    monkeypatch.setattr(
        Trainee, "evaluate", lambda self, split="val": seen.append(split) or orig(self, split)
    )
    _episode(HPOEnv("default-v1", tasks=["wine-mlp"], budget_scale=0.2), 0, "wine-mlp")
    assert seen and set(seen) == {"val"}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="task 'nope' is not in"):
        HPOEnv("default-v1", tasks=["digits-mlp"]).reset(options={"task": "nope"})
    with pytest.raises(ValueError, match="budget_scale must be > 0, got 0"):
        HPOEnv("default-v1", budget_scale=0)
    with pytest.raises(ValueError, match="unknown knobs"):
        HPOEnv("default-v1", tasks=["digits-mlp"]).reset(options={"hp": {"momentum": 0.9}})
    with pytest.raises(ValueError, match=r"action\[0\] must be an integer in \[0, 4\], got 7"):
        env = HPOEnv("default-v1", tasks=["wine-mlp"], budget_scale=0.1)
        env.reset(seed=0)
        env.step(np.array([7, 1, 1]))


def test_lr_scale_trains_with_a_hidden_factor_on_the_learning_rate():
    """lr_scale (domain randomisation): the run trains with c x the learning rate the
    policy sets and sees; everything else is the episode of an unscaled env."""
    kw = dict(split="all", tasks=["digits-mlp"], budget_scale=0.05)
    scaled = HPOEnv("default-v1", lr_scale=(4.0, 4.0), **kw)
    plain = HPOEnv("default-v1", **kw)
    o1, i1 = scaled.reset(seed=3, options={"task": "digits-mlp", "hp": {"lr": 1e-3}})
    o2, i2 = plain.reset(seed=3, options={"task": "digits-mlp", "hp": {"lr": 4e-3}})
    assert i1["hp"]["lr"] == 1e-3 and scaled.trainee.hp["lr"] == 4e-3 and i1["lr_scale"] == 4.0
    assert "lr_scale" not in i2
    for a in ([3, 1, 1], [0, 0, 2], [4, 2, 1], [2, 1, 1]):
        o1, r1, *_, i1 = scaled.step(np.array(a))
        o2, r2, *_, i2 = plain.step(np.array(a))
        assert r1 == r2 and i1["val_loss"] == i2["val_loss"]  # the same run
        assert scaled.trainee.hp["lr"] == pytest.approx(4 * i1["hp"]["lr"])
        assert i2["hp"]["lr"] == pytest.approx(4 * i1["hp"]["lr"])
        assert o1[1] < o2[1]  # but the policy sees the unscaled learning rate
    rand = HPOEnv("default-v1", lr_scale=(0.25, 4.0), **kw)
    cs = [rand.reset(seed=s)[1]["lr_scale"] for s in range(20)]
    assert all(0.25 <= c <= 4.0 for c in cs) and len(set(cs)) == 20
    assert [
        HPOEnv("default-v1", lr_scale=(0.25, 4.0), **kw).reset(seed=s)[1]["lr_scale"]
        for s in range(20)
    ] == cs
    for bad, msg in (
        ((2.0, 1.0), "low <= high"),
        ((0.0, 1.0), "finite numbers > 0"),
        ((1.0,), "two"),
    ):
        with pytest.raises(ValueError, match=msg):
            HPOEnv("default-v1", lr_scale=bad, **kw)


def test_creating_envs_leaves_the_thread_setting_alone():
    """Thread limits belong to the CLI and worker processes, not to library calls."""
    code = (
        "import torch; torch.set_num_threads(2); from rlhpo.env import HPOEnv; "
        "from rlhpo.vec_env import make_vec_env; "
        "HPOEnv('default-v1', tasks=['wine-mlp']); "
        "make_vec_env('default-v1', n_envs=2, backend='dummy', tasks=['wine-mlp']); "
        "make_vec_env('default-v1', n_envs=2, backend='batched', tasks=['wine-mlp']); "
        "print(torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"
    from rlhpo.runtime import limit_threads

    assert limit_threads() == 1
