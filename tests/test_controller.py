import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from rlhpo.actions import ActionCodec
from rlhpo.controller import Controller
from rlhpo.env import HPOEnv, run_seed_for
from rlhpo.knobs import SearchSpace, get_dropout, get_learning_rate
from rlhpo.observation import encoder_class
from rlhpo.policy import PolicyNet, load_policy, save_policy
from rlhpo.trainees import build_trainee


def random_policy(path, seed=0, gain=8.0, obs_version=1, env=None):
    """A randomly initialised policy; ``gain`` scales its output so that its
    argmax actions vary with the observation (not one action everywhere)."""
    torch.manual_seed(seed)
    net = PolicyNet(obs_dim=encoder_class(obs_version).SIZE)
    with torch.no_grad():
        net.action_net.weight.mul_(gain)
    extra = {} if env is None else {"env": env}
    return save_policy(
        path, net, obs_version=obs_version, suite="default", agent="test-random", **extra
    )


def forced_policy(path, lr=3, batch=2, dropout=2):
    """A policy that always takes one action (by default lr x2, batch up, dropout +0.1)."""
    net = PolicyNet()
    with torch.no_grad():
        net.action_net.weight.zero_()
        bias = torch.full((sum(ActionCodec.NVEC),), -10.0)
        off = np.cumsum((0,) + ActionCodec.NVEC[:-1])
        for o, i in zip(off, (lr, batch, dropout), strict=True):
            bias[o + i] = 10.0
        net.action_net.bias.copy_(bias)
    return save_policy(path, net, suite="default", agent="test-forced")


@pytest.mark.parametrize(
    "task,seed,obs_version,mode",
    [
        ("digits-mlp", 3, 1, "plain"),
        ("friedman-mlp", 1, 1, "plain"),
        ("seq-transformer", 2, 1, "plain"),
        ("digits-mlp", 3, 2, "plain"),
        ("friedman-mlp", 1, 2, "plain"),
        ("friedman-mlp", 1, 1, "guard"),
        ("digits-mlp", 3, 2, "residual"),
        ("friedman-mlp", 1, 2, "residual"),
        ("digits-mlp", 3, 3, "residual"),
    ],
)
def test_controller_observations_equal_env(tmp_path, task, seed, obs_version, mode):
    """The env and the Controller are one implementation: equal observations and
    hyperparameters, with the guard on in both, and over a base schedule."""
    from rlhpo.residual import BaseSchedule

    base = BaseSchedule((("adam", 0.01), ("sgd", 0.05))) if mode == "residual" else None
    env_rec = None if base is None else {"base_schedule": base.to_json(), "collapse_k": 3.0}
    policy = load_policy(
        random_policy(tmp_path / "pol", seed=seed, obs_version=obs_version, env=env_rec)
    )
    assert policy.obs_version == obs_version
    guard = mode != "plain"
    env = HPOEnv(
        "default-v1",
        split="all",
        tasks=[task],
        budget_scale=0.05,
        collapse_k=3.0 if guard else None,
        **policy.env_overrides(),
    )
    spec = env.tasks[task]
    obs, info = env.reset(seed=seed, options={"task": task, "start": "default"})

    tr = build_trainee(spec, spec.default, seed=run_seed_for(seed))
    ctl = Controller.for_trainee(
        policy,
        tr,
        budget_samples=spec.budget_samples,
        collapse=guard,
        interval_samples=spec.interval_samples,
    )
    if base is not None:
        assert ctl.hp["lr"] == info["hp"]["lr"] == 0.01  # the level starts at the peak
    ev = tr.evaluate()
    d = ctl.start(val_loss=ev["loss"], val_score=ev["score"])
    np.testing.assert_array_equal(d.observation, obs)

    hps, done, trends, shaped = set(), False, 0, 0
    while not done:
        action = policy.act(obs)
        np.testing.assert_array_equal(d.action, action)
        lr_set = tr.hp["lr"]  # what the controller set for the coming interval
        obs, _, term, trunc, info = env.step(action)
        if base is not None:  # the lr in force follows the schedule, alike in both
            assert info["lr_in_force"] == pytest.approx(lr_set, rel=1e-9)
            shaped += lr_set != pytest.approx(info["hp"]["lr"])  # the shape moved it off the level
        done = term or trunc
        assert not info["diverged"]
        st = tr.train(min(spec.interval_samples, spec.budget_samples - tr.samples_seen))
        ev = tr.evaluate()
        # v2 reads the per-batch losses: half the intervals report them one by one.
        if obs_version >= 2 and ctl.interval % 2:
            for lv in st.batch_losses:
                ctl.observe_loss(lv)
            batch_losses = None
        else:
            batch_losses = st.batch_losses
        d = ctl.step(
            train_loss=st.train_loss,
            val_loss=ev["loss"],
            val_score=ev["score"],
            samples=tr.samples_seen,
            batch_losses=batch_losses,
        )
        np.testing.assert_allclose(d.observation, obs, rtol=0, atol=1e-6)
        if obs_version >= 2 and len(st.batch_losses) >= 3:
            assert d.observation[19] != 0 and d.observation[20] > 0  # slope and noise seen
            trends += 1
        assert ctl.history.last.hp == info["hp"]  # the hp the interval was trained with
        hps.add(tuple(info["hp"].values()))
    assert d.done and ctl.done and tr.samples_seen == spec.budget_samples
    assert len(hps) >= 3, "the policy must actually change hyperparameters for this test to bite"
    assert obs_version == 1 or trends >= 2, "v2's loss trend must be seen for this test to bite"
    assert base is None or shaped >= 2, "the schedule must move the lr for this test to bite"


def _small_run(tmp_path, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctl = Controller.load(
        forced_policy(tmp_path / "pol"),
        optimizer=opt,
        model=model,
        budget_samples=1000,
        n_classes=3,
        **{"batch_size": 64, **kw},
    )
    return model, opt, ctl


def _train_a_bit(model, opt, steps=3):
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_applies_lr_dropout_and_batch_size(tmp_path):
    model, opt, ctl = _small_run(tmp_path)
    loader = ctl.loader(torch.utils.data.TensorDataset(torch.arange(300)), shuffle=True)
    assert [len(b[0]) for b in loader] == [64] * 4 + [44]
    d = ctl.start(val_loss=1.1, val_score=0.3)
    assert d.hp == {"lr": 2e-3, "batch_size": 128, "dropout": pytest.approx(0.2)}
    assert get_learning_rate(opt) == 2e-3
    assert all(m.p == pytest.approx(0.2) for m in model.modules() if isinstance(m, nn.Dropout))
    sizes = [len(b[0]) for b in loader]
    assert sizes == [128, 128, 44]
    assert sorted(torch.cat([b[0] for b in loader]).tolist()) == list(range(300))
    d = ctl.step(train_loss=1.0, val_loss=1.0, val_score=0.4, samples=300)
    assert d.hp == {"lr": 4e-3, "batch_size": 256, "dropout": pytest.approx(0.3)}
    assert d.as_log()["hp/batch_size"] == 256.0 and d.as_log()["hp/rollback"] == 0.0


def test_batch_size_changes_mid_pass(tmp_path):
    _, _, ctl = _small_run(tmp_path)
    it = iter(ctl.batch_sampler(500, shuffle=False))
    assert len(next(it)) == 64
    ctl.start(val_loss=1.1, val_score=0.3)
    assert next(it) == list(range(64, 192))


def test_lr_change_survives_scheduler(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ctl = Controller.load(
        forced_policy(tmp_path / "pol"),
        optimizer=opt,
        model=model,
        scheduler=sched,
        budget_samples=1000,
        n_classes=3,
        batch_size=64,
    )
    for _ in range(3):
        opt.step()
        sched.step()
    assert get_learning_rate(opt) == pytest.approx(0.01 / 4)
    d = ctl.start(val_loss=1.1, val_score=0.3)  # lr x2 from the lr in force
    assert d.lr == pytest.approx(0.005)
    opt.step()
    sched.step()
    assert get_learning_rate(opt) == pytest.approx(0.02 / 5)  # base doubled, shape kept


def test_nan_loss_rolls_back_and_lowers_lr(tmp_path, caplog):
    model, opt, ctl = _small_run(tmp_path, freeze=("lr",))
    ctl.start(val_loss=1.1, val_score=0.3)
    _train_a_bit(model, opt)
    ctl.step(train_loss=1.0, val_loss=1.0, val_score=0.4, samples=100)
    good_params = [p.detach().clone() for p in model.parameters()]
    good_opt_steps = opt.state_dict()["state"][0]["step"].item()
    good_hp = dict(ctl.history.last.hp)  # the hp the good interval was trained with
    _train_a_bit(model, opt)
    assert not torch.equal(next(model.parameters()), good_params[0])

    losses = [float("nan"), 50.0, float("inf")]  # NaN, exploding (> 10 x 1.1), inf
    lr = good_hp["lr"]
    for i, loss in enumerate(losses):
        with caplog.at_level(logging.WARNING, logger="rlhpo.controller"):
            d = ctl.step(train_loss=loss, val_loss=1.0, val_score=0.4, samples=200 + 100 * i)
        lr *= 0.25
        assert d.rolled_back and d.action is None
        assert d.lr == pytest.approx(lr) and get_learning_rate(opt) == pytest.approx(lr)
        assert d.batch_size == good_hp["batch_size"]
        assert get_dropout(model) == pytest.approx(good_hp["dropout"])
        for p, g in zip(model.parameters(), good_params, strict=True):
            assert torch.equal(p, g)
        assert opt.state_dict()["state"][0]["step"].item() == good_opt_steps
        assert "restored model, optimizer of interval 1" in d.events[0]
        assert "divergence" in caplog.text
        _train_a_bit(model, opt)
    assert len(ctl.events) == 3 and len(ctl.history) == 2  # bad intervals are not recorded
    d = ctl.step(train_loss=0.9, val_loss=0.9, val_score=0.5, samples=600)
    assert not d.rolled_back and d.action is not None


def test_nan_without_model_lowers_lr_and_says_so(tmp_path):
    ctl = Controller.load(
        forced_policy(tmp_path / "pol", lr=2),
        budget_samples=1000,
        metric="r2",
        batch_size=32,
    )
    ctl.hp["lr"] = 1e-2
    d = ctl.step(train_loss=1.0, val_loss=1.0, val_score=0.1, samples=50)  # no start()
    assert not d.rolled_back and d.hp["batch_size"] == 64
    d = ctl.step(train_loss=math.nan, val_loss=1.0, val_score=0.1, samples=100)
    assert d.rolled_back and d.lr == pytest.approx(2.5e-3)
    assert "nothing to restore" in d.events[0]


def test_dry_run_keeps_hyperparameters(tmp_path):
    model, opt, ctl = _small_run(tmp_path, apply=False)
    d = ctl.start(val_loss=1.1, val_score=0.3)
    assert d.action.tolist() == [3, 2, 2]
    assert d.hp == {"lr": 1e-3, "batch_size": 64, "dropout": pytest.approx(0.1)}
    assert get_learning_rate(opt) == 1e-3 and get_dropout(model) == pytest.approx(0.1)


def test_budget_end_and_bad_input(tmp_path):
    _, _, ctl = _small_run(tmp_path)
    ctl.start(val_loss=1.1, val_score=0.3)
    with pytest.raises(ValueError, match="start\\(\\) must come first|cumulative"):
        ctl.step(train_loss=1.0, val_loss=1.0, val_score=0.4, samples=-5)
    d = ctl.step(train_loss=1.0, val_loss=1.0, val_score=0.4, samples=1000)
    assert d.done and d.action is None
    with pytest.raises(RuntimeError, match="budget of 1000 samples is spent"):
        ctl.step(train_loss=1.0, val_loss=1.0, val_score=0.4, samples=1000)
    with pytest.raises(RuntimeError, match="start\\(\\) must come first"):
        ctl.start(val_loss=1.0, val_score=0.1)
    pol = load_policy(forced_policy(tmp_path / "p2"))
    with pytest.raises(ValueError, match="needs n_classes >= 2.*got 0"):
        Controller(pol, budget_samples=100)
    with pytest.raises(ValueError, match="budget_samples must be a positive int, got 0"):
        Controller(pol, budget_samples=0, n_classes=3)
    with pytest.raises(ValueError, match="metric must be accuracy or r2, got 'f1'"):
        Controller(pol, budget_samples=10, metric="f1")
    with pytest.raises(ValueError, match="loader\\(\\) sets 'batch_size' itself"):
        Controller(pol, budget_samples=10, metric="r2", batch_size=4).loader(
            [1, 2, 3], batch_size=4
        )


def test_space_and_freeze(tmp_path):
    pol = load_policy(forced_policy(tmp_path / "pol"))
    space = SearchSpace(lr=(1e-4, 1e-2), batch_sizes=(8, 16), dropout=(0.0, 0.15))
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ctl = Controller(
        pol,
        optimizer=opt,
        model=model,
        budget_samples=100,
        metric="r2",
        space=space,
        batch_size=64,
        freeze=("batch_size",),
    )
    assert ctl.hp == {"lr": 1e-2, "batch_size": 16, "dropout": 0.15}  # clipped on entry
    assert get_learning_rate(opt) == 1e-2
    d = ctl.start(val_loss=1.0, val_score=0.0)
    assert d.hp == {"lr": 1e-2, "batch_size": 16, "dropout": 0.15}  # clipped, batch frozen


def _apply_cli(tmp_path, *extra):
    from typer.testing import CliRunner

    from rlhpo.cli import app

    pol = random_policy(tmp_path / "pol", seed=1)
    args = ["apply", "--policy", str(pol), "--task", "breast_cancer-mlp", "--suite", "default-v1"]
    args += ["--seed", "0"]
    return CliRunner().invoke(app, [*args, "--budget-scale", "0.1", *extra])


def test_apply_cli_end_to_end(tmp_path):
    import csv

    out = tmp_path / "run"
    res = _apply_cli(tmp_path, "--out", str(out), "--no-wandb", "--start", "low-lr")
    assert res.exit_code == 0, res.output
    assert "final val" in res.output and "test" in res.output and "optimizer steps" in res.output
    rows = list(csv.DictReader(open(out / "trace.csv")))
    assert [int(r["interval"]) for r in rows] == list(range(21))
    assert float(rows[0]["lr"]) == 1e-5 and rows[0]["train_loss"] == ""
    assert int(rows[-1]["samples"]) == 1700  # 17000 x 0.1: the whole budget
    assert len({(r["lr"], r["batch_size"], r["dropout"]) for r in rows}) > 3
    assert (out / "curves.png").stat().st_size > 10_000
    logged = (out / "log.jsonl").read_text()
    assert '"hp/lr"' in logged and '"final/test_score"' in logged
    assert not (out / "wandb").exists()
    again = _apply_cli(tmp_path, "--out", str(out), "--no-wandb")
    assert again.exit_code == 2 and "already holds a trace.csv" in again.output
    bad = _apply_cli(tmp_path, "--out", str(tmp_path / "r2"), "--start", "warm")
    assert (
        bad.exit_code == 2
        and "--start must be one of default, low-lr, high-lr, random" in bad.output
    )


def test_apply_vs_static_runs_the_same_start_unchanged(tmp_path):
    """--vs-static: the static run from the policy run's start and seed, with cost ratios."""
    from rlhpo.apply import apply_policy
    from rlhpo.baselines.single import run_single
    from rlhpo.env import run_seed_for
    from rlhpo.tasks import load_suite

    pol = random_policy(tmp_path / "pol", seed=1)
    kw = dict(seed=3, start="low-lr", budget_scale=0.1, use_wandb=False, suite="default-v1")
    res = apply_policy(pol, "breast_cancer-mlp", out_dir=tmp_path / "a", vs_static=True, **kw)
    st = res.static
    spec = load_suite("default-v1").task("breast_cancer-mlp").scaled(0.1)
    hp = {"lr": 1e-5, "batch_size": 64, "dropout": 0.1}
    want = run_single(spec, hp, run_seed_for(3))
    assert st["test_score"] == want.test_score and st["optimizer_steps"] == want.optimizer_steps
    assert st["samples"] == res.samples == 1700
    assert st["steps_ratio"] == res.optimizer_steps / want.optimizer_steps
    assert st["wall_ratio"] > 0 and st["train_seconds"] > 0
    plain = apply_policy(pol, "breast_cancer-mlp", out_dir=tmp_path / "b", **kw)
    assert plain.static is None and plain.test == res.test  # the policy run is unchanged
    out = _apply_cli(tmp_path, "--out", str(tmp_path / "c"), "--no-wandb", "--vs-static")
    assert out.exit_code == 0, out.output
    assert "static run from the same start" in out.output and "x the steps" in out.output


def test_apply_cli_logs_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    res = _apply_cli(tmp_path, "--out", str(out), "--start", "random")
    assert res.exit_code == 0, res.output
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_rollback_to_before_the_first_step_and_with_scheduler(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ctl = Controller.load(
        forced_policy(tmp_path / "pol"),
        optimizer=opt,
        model=model,
        scheduler=sched,
        budget_samples=1000,
        n_classes=3,
        batch_size=64,
    )
    for _ in range(2):
        _train_a_bit(model, opt)
        sched.step()
    assert len(opt.state) == 6 and sched.last_epoch == 2
    d = ctl.step(train_loss=float("inf"), val_loss=1.0, val_score=0.3, samples=10)
    assert "restored model, optimizer, scheduler of interval 0" in d.events[0]
    for k, v in model.state_dict().items():  # parameters and BatchNorm buffers
        assert torch.equal(v, init[k]), k
    assert len(opt.state) == 0 and sched.last_epoch == 0
    assert get_learning_rate(opt) == pytest.approx(2.5e-4)
    _train_a_bit(model, opt)  # the optimizer works on from the restored state
    sched.step()
    assert get_learning_rate(opt) == pytest.approx(2.5e-4 / 2)
