"""The env's rollback on divergence: what the Controller does in a user's loop.

Measured on main before it (issue #22): with the shipped residual schedule the
train-split task cnn2d-01-digits diverges at its peak on every seed (intervals 1-3),
so the env ended the run with score 0, while a user's Controller would have gone back
to the last good state and trained on.
"""

import numpy as np
import pytest
import torch

from rlhpo.agents import load_settings
from rlhpo.controller import Controller
from rlhpo.env import EnvConfig, HPOEnv, run_seed_for
from rlhpo.policy import load_policy
from rlhpo.shipped import policy_path
from rlhpo.trainees import build_trainee

TASK = "cnn2d-01-digits"  # train split; diverges at the tuned peak (seed 0: interval 3)


def _env(**kw):
    cfg = load_settings("vine").env_config("default")
    return HPOEnv(EnvConfig.of(cfg, budget_scale=1.0, lr_scale=(1.0, 1.0), tasks=[TASK], **kw))


def _run(env, seed=0):
    obs, info = env.reset(seed=seed, options={"task": TASK, "start": "default"})
    steps = []
    done = False
    while not done:
        prev = obs
        obs, r, term, trunc, info = env.step(env.codec.noop)
        steps.append((prev, obs, r, info))
        done = term or trunc
    return steps


def test_without_rollback_the_divergence_ends_the_run_at_zero():
    steps = _run(_env())
    last = steps[-1][3]
    assert last["diverged"] and last["interval"] == 3 and last["val_norm_score"] == 0.0
    assert last["samples"] < last["budget_samples"]


def test_rollback_goes_back_to_the_last_good_state_and_trains_on():
    env = _env(rollback=True)
    steps = _run(env)
    first = next(i for i, s in enumerate(steps) if "rollback" in s[3])
    prev_obs, obs, r, info = steps[first]
    good = steps[first - 1][3]
    assert info["interval"] == 3 and not info["diverged"]
    assert "validation loss" in info["rollback"] or "training loss" in info["rollback"]
    # Not recorded: the observation and score are the last good interval's.
    np.testing.assert_array_equal(obs, prev_obs)
    assert info["val_norm_score"] == good["val_norm_score"]
    assert r == pytest.approx(-env.divergence_penalty - info["compute_charge"])
    # The lr level is the good interval's x 1/4; the next action is not applied.
    assert info["hp"]["lr"] == pytest.approx(good["hp"]["lr"] * 0.25)
    nxt = steps[first + 1][3]
    assert nxt["hp"]["lr"] == pytest.approx(info["hp"]["lr"])
    # The run ends at its budget, not at the divergence, and learned.
    last = steps[-1][3]
    assert last["samples"] == last["budget_samples"] and not last["diverged"]
    assert last["val_norm_score"] > 0.5
    assert len(env.history) == len(steps) + 1 - sum("rollback" in s[3] for s in steps)


def test_a_held_action_after_a_rollback_is_not_applied():
    env = _env(rollback=True)
    env.reset(seed=0, options={"task": TASK, "start": "default"})
    up = np.array(env.codec.noop)
    up[0] = 4  # lr x4
    info = {}
    while "rollback" not in info:
        obs, r, term, trunc, info = env.step(env.codec.noop)
    level = info["hp"]["lr"]
    _, _, _, _, info = env.step(up)  # held: trains at the backed-off level
    assert info["hp"]["lr"] == pytest.approx(level)
    _, _, _, _, info = env.step(up)  # applied again
    assert info["hp"]["lr"] == pytest.approx(level * 4) or "rollback" in info


def test_save_and_load_state_replay_a_rollback_exactly():
    env = _env(rollback=True)
    env.reset(seed=0, options={"task": TASK, "start": "default"})
    env.step(env.codec.noop)
    state = env.save_state()
    runs = []
    for _ in range(2):
        env.load_state(state)
        infos = []
        for _ in range(4):
            _, r, _, _, info = env.step(env.codec.noop)
            infos.append((r, info["val_norm_score"], "rollback" in info))
        runs.append(infos)
    assert runs[0] == runs[1] and any(x[2] for x in runs[0])


def test_controller_equals_the_env_through_a_rollback():
    """The prior (shipped as v2-prior) in a user's loop (Controller) and in the env
    with rollback: the same observations, hyperparameters and rollbacks on a run that
    diverges. (The shipped default itself lowers the lr before this run diverges.)"""
    policy = load_policy(policy_path("v2-prior"))
    env = HPOEnv(
        "default",
        split="all",
        tasks=[TASK],
        collapse_k=policy.collapse_k,
        rollback=True,
        **policy.env_overrides(),
    )
    spec = env.tasks[TASK]
    obs, info = env.reset(seed=0, options={"task": TASK, "start": "default"})
    tr = build_trainee(spec, spec.default, seed=run_seed_for(0))
    ctl = Controller.for_trainee(
        policy, tr, budget_samples=spec.budget_samples, interval_samples=spec.interval_samples
    )
    ev = tr.evaluate()
    d = ctl.start(val_loss=ev["loss"], val_score=ev["score"])
    np.testing.assert_array_equal(d.observation, obs)
    rollbacks, done = 0, False
    while not done:
        action = policy.act(obs) if "rollback" not in info else env.codec.noop
        lr_set = tr.hp["lr"]
        obs, _, term, trunc, info = env.step(action)
        done = term or trunc
        if "rollback" not in info:  # else it is the next interval's (as the Controller's)
            assert info["lr_in_force"] == pytest.approx(lr_set, rel=1e-9)
        st = tr.train(min(spec.interval_samples, spec.budget_samples - tr.samples_seen))
        ev = tr.evaluate()
        d = ctl.step(
            train_loss=st.train_loss,
            val_loss=ev["loss"],
            val_score=ev["score"],
            samples=tr.samples_seen,
            batch_losses=st.batch_losses,
        )
        assert d.rolled_back == ("rollback" in info)
        rollbacks += d.rolled_back
        if d.rolled_back:  # both at the good interval's level x 1/4
            assert ctl.hp["lr"] == pytest.approx(info["hp"]["lr"], rel=1e-9)
        else:
            np.testing.assert_allclose(d.observation, obs, rtol=0, atol=1e-6)
            assert ctl.history.last.hp == info["hp"]
    assert rollbacks >= 1 and ctl.done and tr.samples_seen == spec.budget_samples
    assert [r.val_score for r in ctl.history.records] == pytest.approx(
        [r.val_score for r in env.history.records], abs=1e-9
    )


def test_bad_lr_backoff_is_named():
    with pytest.raises(ValueError, match=r"lr_backoff must be in \(0, 1\), got 1.5"):
        HPOEnv("default", lr_backoff=1.5)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_recipes_take_rollback_and_refuse_a_bad_value():
    assert load_settings("vine", overrides=["rollback=true"]).env_config("default").rollback
    assert not load_settings("vine").env_config("default").rollback  # the shipped recipe's
    with pytest.raises(ValueError, match="rollback must be true or false, got 3"):
        load_settings("vine", overrides=["rollback=3"])


def test_with_an_lr_factor_every_lr_of_the_space_stays_reachable():
    """At lr_scale 1/4 a run whose level starts at the space's top (the SGD peak 0.1)
    trained at 0.025 and no move could raise it (issue #22's branch data scored every
    raise there 0); the policy's lr bounds are the space's / c now."""
    cfg = load_settings("vine").env_config("default")
    env = HPOEnv(EnvConfig.of(cfg, budget_scale=0.05, tasks=["decoder-00-lm_reverse"]))
    _, info = env.reset(seed=0, options={"lr_scale": 0.25})
    assert info["hp"]["lr"] == pytest.approx(0.1)  # the SGD peak, the space's top
    up = np.array(env.codec.noop)
    up[0] = 4  # lr x4
    _, _, _, _, info = env.step(up)
    assert info["hp"]["lr"] == pytest.approx(0.4)  # visible level; the run trains at 0.1
    assert env.trainee.hp["lr"] <= 0.1 + 1e-12
    _, _, _, _, info = env.step(up)
    assert info["hp"]["lr"] == pytest.approx(0.4)  # the space's top / c: no higher
    # Without a factor nothing changes: the level stays within the space.
    _, info = env.reset(seed=0, options={"lr_scale": 1.0})
    _, _, _, _, info = env.step(up)
    assert info["hp"]["lr"] == pytest.approx(0.1)


def test_batched_vec_env_rolls_back_as_the_env_does():
    """The batched backend (exact mode) shares the env's step: the same rollbacks and
    final scores as one HPOEnv per seed."""
    from rlhpo.vec_env import make_vec_env

    cfg = EnvConfig.of(
        load_settings("vine").env_config("default"),
        budget_scale=1.0,
        lr_scale=(1.0, 1.0),
        tasks=[TASK],
        rollback=True,
        timing=False,
    )
    venv = make_vec_env(cfg, n_envs=2, seed=0, backend="batched", exact=True, monitor=False)
    venv.reset()
    keep = np.array([[2, 1, 1]] * 2)
    finals, rollbacks = {}, [0, 0]
    while len(finals) < 2:
        _, _, dones, infos = venv.step(keep)
        for i, (d, info) in enumerate(zip(dones, infos, strict=True)):
            if i not in finals:
                rollbacks[i] += "rollback" in info
                if d:
                    finals[i] = info["val_norm_score"]
    venv.close()
    env = HPOEnv(cfg)
    for seed in (0, 1):
        env.reset(seed=seed)
        n, done = 0, False
        while not done:
            _, _, term, trunc, info = env.step(np.array([2, 1, 1]))
            n += "rollback" in info
            done = term or trunc
        assert finals[seed] == pytest.approx(info["val_norm_score"], abs=1e-6)
        assert rollbacks[seed] == n
    assert sum(rollbacks) >= 1


def test_rollback_must_be_a_bool_and_extreme_lr_factors_stay_within_the_knob_limits():
    with pytest.raises(ValueError, match="rollback must be true or false, got 'no'"):
        HPOEnv("default", rollback="no")
    for c in (1e-9, 1e4):  # space / c would leave the lr knob's limits [1e-8, 10]
        env = HPOEnv("default", budget_scale=0.05, lr_scale=(c, c))
        env.reset(seed=0)
        lo, hi = env.space.bounds("lr")
        assert 1e-8 <= lo <= hi <= 10.0
        env.step(env.codec.noop)
