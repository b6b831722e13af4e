"""Residual control over a base schedule (rlhpo.residual) and the do-no-harm guard's
place in training and evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhpo.actions import ActionCodec
from rlhpo.baselines.schedules import WarmupCosine
from rlhpo.env import HPOEnv
from rlhpo.policy import PolicyFileError, load_policy
from rlhpo.residual import BaseSchedule, BaseScheduleError

BASE = BaseSchedule((("adam", 0.01), ("sgd", 0.05)))


def test_shape_is_the_warmup_cosine_baselines_shape():
    total = 1000
    wc = WarmupCosine(total)
    for step in (0, 50, 100, 101, 400, 999):
        assert BASE.shape(step / total) == pytest.approx(wc(step), abs=2e-3)
    # An interval trains at the shape's mean over it, not at its start.
    assert BASE.interval_multiplier(0.0, 0.1) == pytest.approx(0.52, abs=1e-6)
    assert BASE.interval_multiplier(0.9, 1.0) < 0.03
    assert BASE.lr(0.02, 0, 100, 1000) == pytest.approx(0.02 * 0.52, rel=1e-6)


def test_peaks_per_optimizer_kind_and_json_round_trip():
    assert BASE.peak("adam") == BASE.peak("AdamW") == 0.01
    assert BASE.peak("sgd") == BASE.peak("SGD") == 0.05
    assert BaseSchedule.from_json(json.loads(json.dumps(BASE.to_json()))) == BASE


@pytest.mark.parametrize(
    "raw,needle",
    [
        ({"kind": "cosine", "peaks": {"adam": 0.01}}, "kind must be one of warmup-cosine"),
        ({"peaks": {"adam": -1}}, "peak for 'adam' must be in (0, 10]"),
        ({"peaks": {"rmsprop": 0.01}}, "optimizer kinds are adam, sgd"),
        ({"peaks": 0.01}, "peaks must be an object"),
        ({"peaks": {"adam": 0.01}, "warmup": 1.5}, "warmup must be in [0, 1)"),
        ({"peaks": {"adam": 0.01}, "extra": 1}, "unknown keys ['extra']"),
    ],
)
def test_bad_base_schedules_are_one_line_errors(raw, needle):
    with pytest.raises(BaseScheduleError) as e:
        BaseSchedule.from_json(raw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_env_config_rejects_an_unknown_schedule_name():
    with pytest.raises(BaseScheduleError, match="base_schedule must be none or one of"):
        HPOEnv("tiny", base_schedule="one-cycle")


def _episode(env, seed, action):
    obs, info = env.reset(seed=seed, options={"start": "default"})
    lrs, done = [], False
    while not done:
        obs, _, term, trunc, info = env.step(action)
        lrs.append(info["lr_in_force"])
        done = term or trunc
    return info, lrs


def test_keep_runs_the_schedule_and_ignores_the_start():
    env = HPOEnv("tiny", tasks=["bc-mlp"], base_schedule=BASE, budget_scale=0.2)
    keep = np.array(ActionCodec.NOOP)
    info, lrs = _episode(env, 0, keep)
    spec = env.tasks["bc-mlp"]
    assert info["hp"]["lr"] == BASE.peak(spec.optimizer)  # the level never moved
    n, b = spec.interval_samples, spec.budget_samples
    want = [BASE.lr(0.01, i * n, min(n, b - i * n), b) for i in range(len(lrs))]
    np.testing.assert_allclose(lrs, np.maximum(want, 1e-5), rtol=1e-6)
    assert lrs[0] < 0.01 and lrs[-1] < 0.2 * max(lrs)  # warm-up below the level, then decay
    # A start far from good changes nothing: the residual policy owns the lr.
    obs, _ = env.reset(seed=0, options={"hp": {"lr": 1e-5}})
    assert env.hp["lr"] == 0.01
    # "lr x2" doubles the level, and with it every later interval's lr.
    up = keep.copy()
    up[0] = 3
    env.reset(seed=0, options={"start": "default"})
    _, _, _, _, info = env.step(up)
    assert info["hp"]["lr"] == pytest.approx(0.02)
    assert info["lr_in_force"] == pytest.approx(2 * lrs[0], rel=1e-6)


def test_noop_bias_makes_the_untrained_ppo_policy_keep(tmp_path):
    from rlhpo.agents.ppo import PPOSettings, train_ppo

    s = PPOSettings(
        n_envs=2, vec_env="dummy", n_steps=4, batch_size=8, n_epochs=1, noop_bias=3.0,
        budget_scale=0.05, base_schedule="warmup-cosine", obs_version=2, collapse_k=3.0,
        freeze=("batch_size", "dropout"),
    )  # fmt: skip
    train_ppo(s, tmp_path / "run", suite="tiny", timesteps=8, seed=0, use_wandb=False,
              show_progress=False)  # fmt: skip
    pol = load_policy(tmp_path / "run" / "policy")
    assert pol.base_schedule is not None and pol.collapse_k == 3.0 and pol.obs_version == 2
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(64, pol.net.obs_dim)).astype(np.float32)
    acts = pol.net.act(obs)
    assert (acts[:, 0] == ActionCodec.NOOP[0]).mean() > 0.9


def test_a_malformed_base_schedule_in_a_policy_file_is_refused(tmp_path):
    from rlhpo.observation import encoder_class
    from rlhpo.policy import PolicyNet, save_policy

    net = PolicyNet(obs_dim=encoder_class(2).SIZE)
    save_policy(
        tmp_path / "p", net, obs_version=2, env={"base_schedule": {"peaks": {"adam": 50.0}}}
    )
    with pytest.raises(PolicyFileError, match=r"env\.base_schedule peak for 'adam'"):
        load_policy(tmp_path / "p")


def test_the_policy_file_says_whether_the_guard_runs(tmp_path):
    import torch

    from rlhpo.compare.methods import parse_method
    from rlhpo.controller import Controller
    from rlhpo.observation import encoder_class
    from rlhpo.policy import PolicyNet, save_policy

    net = PolicyNet(obs_dim=encoder_class(1).SIZE)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kw = dict(optimizer=opt, model=model, budget_samples=100, n_classes=2, batch_size=64)
    save_policy(tmp_path / "off", net, guard=False, env={"collapse_k": 5.0})
    save_policy(tmp_path / "plain", net, env={"collapse_k": 5.0})
    assert Controller(load_policy(tmp_path / "off"), **kw).collapse is None
    assert Controller(load_policy(tmp_path / "plain"), **kw).collapse.k == 5.0
    assert Controller(load_policy(tmp_path / "off"), collapse=True, **kw).collapse.k == 5.0
    assert parse_method(f"policy:{tmp_path / 'off'}").guard is None  # the file decides
    assert parse_method(f"policy:{tmp_path / 'off'}?guard=on").guard is True
    save_policy(tmp_path / "bad", net, guard="yes")
    with pytest.raises(PolicyFileError, match="guard must be true or false, got 'yes'"):
        load_policy(tmp_path / "bad")


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"optimizer_kind": "rmsprop"}, "optimizer_kind must be adam, adamw or sgd, got 'rmsprop'"),
        ({"interval_samples": "abc"}, "interval_samples must be a positive int, got 'abc'"),
        ({"interval_samples": 0}, "interval_samples must be a positive int, got 0"),
    ],
)
def test_controller_residual_arguments_bad_values_are_one_line_errors(kw, needle):
    import torch

    from rlhpo.controller import Controller

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as e:
        Controller.load(
            "default", optimizer=opt, model=model, budget_samples=100, n_classes=2,
            batch_size=64, **kw,
        )  # fmt: skip
    assert str(e.value) == needle


def test_a_nan_noop_bias_is_refused():
    from rlhpo.agents.ppo import PPOSettings

    with pytest.raises(ValueError, match="noop_bias must be a finite number, got nan"):
        PPOSettings(noop_bias=float("nan"))


# -- base_peak="user": the level starts at the run's own lr x peak_factor --------------
USER = BASE.with_peak("user", 3.0)


def test_user_base_peak_starts_at_the_runs_lr_times_the_factor():
    assert USER.start_level("adam", 1e-4) == pytest.approx(3e-4)
    assert USER.start_level("sgd", 2e-5) == pytest.approx(6e-5)
    assert BASE.start_level("sgd", 1e-4) == 0.05  # tuned: the run's lr is replaced
    assert BASE.with_peak(peak_factor=2.0).base_peak == "user"
    assert BASE.with_peak() is BASE
    assert "the run's starting lr x 3" in USER.describe()


def test_user_base_peak_json_round_trip_and_older_files_start_tuned():
    assert BaseSchedule.from_json(json.loads(json.dumps(USER.to_json()))) == USER
    assert USER.to_json()["base_peak"] == "user" and USER.to_json()["peak_factor"] == 3.0
    old = {k: v for k, v in BASE.to_json().items() if k not in ("base_peak", "peak_factor")}
    assert BaseSchedule.from_json(old).base_peak == "tuned"


@pytest.mark.parametrize(
    "raw,needle",
    [
        ({"base_peak": "mine"}, "base_peak must be one of tuned, user, got 'mine'"),
        ({"base_peak": "user", "peak_factor": 0}, "peak_factor must be a number in [0.001, 1000], got 0"),
        ({"base_peak": "user", "peak_factor": float("nan")}, "peak_factor must be a number in [0.001, 1000], got nan"),
        ({"base_peak": "user", "peak_factor": True}, "peak_factor must be a number in [0.001, 1000], got True"),
        ({"base_peak": "user", "peak_factor": "2"}, "peak_factor must be a number in [0.001, 1000], got '2'"),
        ({"peak_factor": 2.0}, "peak_factor applies to base_peak 'user' only; with 'tuned' it must be 1, got 2.0"),
    ],
)  # fmt: skip
def test_bad_base_peaks_are_one_line_errors(raw, needle):
    with pytest.raises(BaseScheduleError) as e:
        BaseSchedule.from_json({"peaks": {"adam": 0.01}, **raw})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_user_base_peak_needs_a_positive_starting_lr():
    with pytest.raises(BaseScheduleError, match=r"needs the run's starting lr > 0, got 0.0$"):
        USER.start_level("adam", 0.0)


def test_env_starts_the_level_at_the_starts_lr_times_the_factor():
    env = HPOEnv("tiny", tasks=["bc-mlp"], base_schedule=USER, budget_scale=0.2)
    env.reset(seed=0, options={"hp": {"lr": 1e-4}})
    assert env.hp["lr"] == pytest.approx(3e-4)
    _, _, _, _, info = env.step(np.array(ActionCodec.NOOP))
    spec = env.tasks["bc-mlp"]
    n, b = spec.interval_samples, spec.budget_samples
    assert info["lr_in_force"] == pytest.approx(USER.lr(3e-4, 0, n, b), rel=1e-6)
    env.reset(seed=0, options={"hp": {"lr": 1e-3}})  # another user, another peak
    assert env.hp["lr"] == pytest.approx(3e-3)


def test_controller_honours_base_peak_as_the_env_does():
    import torch

    from rlhpo.controller import Controller

    model = torch.nn.Linear(2, 2)
    kw = dict(model=model, budget_samples=1000, n_classes=2, batch_size=64)
    opt = torch.optim.Adam(model.parameters(), lr=2e-5)
    tuned = Controller.load("default", optimizer=opt, **kw)
    assert tuned.hp["lr"] == tuned.base.peak("adam")  # the shipped policy: tuned peak
    opt = torch.optim.Adam(model.parameters(), lr=2e-5)
    user = Controller.load("default", optimizer=opt, base_peak="user", peak_factor=5.0, **kw)
    assert user.base.base_peak == "user"
    assert user.hp["lr"] == pytest.approx(user.base.start_level("adam", 2e-5)) == 1e-4
    # The first interval trains at the schedule's warm-up below that level.
    assert opt.param_groups[0]["lr"] < 1e-4


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"base_peak": "mine"}, "base_schedule base_peak must be one of tuned, user, got 'mine'"),
        (
            {"base_peak": "tuned", "peak_factor": 2.0},
            "peak_factor applies to base_peak 'user' only",
        ),
        ({"peak_factor": -1.0}, "peak_factor must be a number in [0.001, 1000], got -1.0"),
    ],
)
def test_controller_bad_base_peaks_are_one_line_errors(kw, needle):
    import torch

    from rlhpo.controller import Controller

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    with pytest.raises(ValueError) as e:
        Controller.load(
            "default", optimizer=opt, model=model, budget_samples=100, n_classes=2,
            batch_size=64, **kw,
        )  # fmt: skip
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_compare_policy_method_takes_base_peak():
    from rlhpo.compare.methods import MethodError, parse_method

    m = parse_method("policy:default?base_peak=user&peak_factor=3")
    assert (m.base_peak, m.peak_factor, m.label) == ("user", 3.0, "policy:default-user-peak-x3")
    assert m.setup()["base_peak"] == "user"
    assert "base_peak" not in parse_method("policy:default").setup()
    with pytest.raises(MethodError, match="base_peak must be one of tuned, user, got 'mine'"):
        parse_method("policy:default?base_peak=mine")
    with pytest.raises(MethodError, match="peak_factor must be a positive number, got 'x'"):
        parse_method("policy:default?peak_factor=x")


def test_agent_settings_train_over_a_user_peak_and_record_it():
    from rlhpo.agents.ppo import PPOSettings

    s = PPOSettings(base_schedule="warmup-cosine", base_peak="user", peak_factor=30.0)
    cfg = s.env_config("tiny")
    assert (cfg.base_schedule.base_peak, cfg.base_schedule.peak_factor) == ("user", 30.0)
    rec = BaseSchedule.from_json(s.env_record(cfg)["base_schedule"])
    assert rec == cfg.base_schedule  # what a policy file records, it runs over
    tuned = PPOSettings(base_schedule="warmup-cosine").env_config("tiny").base_schedule
    assert tuned.base_peak == "tuned"
    with pytest.raises(ValueError, match="need a base_schedule, got base_schedule='none'"):
        PPOSettings(base_peak="user", peak_factor=3.0).env_config("tiny")
    with pytest.raises(BaseScheduleError, match="base_peak must be one of tuned, user"):
        PPOSettings(base_schedule="warmup-cosine", base_peak="mine").env_config("tiny")
