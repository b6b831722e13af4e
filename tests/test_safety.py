"""The one divergence/collapse rule, and the Controller's use of it."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

from rlhpo.actions import ActionCodec
from rlhpo.controller import Controller
from rlhpo.safety import EXPLODE_FACTOR, CollapseRule, DivergenceRule, score_noise
from tests.test_controller import forced_policy


def test_divergence_rule_matches_the_old_one_and_adds_validation_loss():
    rule = DivergenceRule()
    assert rule.explode_factor == EXPLODE_FACTOR == 10.0
    assert rule.check(1.0, 0.5, 0.6) is None
    assert rule.check(1.0, 9.9, 0.6) is None
    assert "training loss 10.5 > 10 x" in rule.check(1.0, 10.5, 0.6)
    assert "training loss is nan" in rule.check(1.0, float("nan"), 0.6)
    assert "validation loss is inf" in rule.check(1.0, 0.5, float("inf"))
    assert rule.check(1.0, 0.5, 0.6, stopped=True) is not None
    # A 130x rise of the validation loss with a calm training loss: divergence now.
    assert "validation loss 130 > 10 x the reference loss 1" in rule.check(1.0, 0.5, 130.0)
    assert rule.check(None, 0.5, 130.0) is None  # no reference yet
    with pytest.raises(ValueError, match="explode_factor must be a finite number > 1, got 1"):
        DivergenceRule(1)


def test_collapse_is_measured_in_noise_units():
    rule = CollapseRule(k=3.0)
    # 1000 validation samples at ~90% accuracy, 10 classes: standard error ~0.01.
    se = score_noise([0.88], n_val=1000, n_classes=10)
    assert 0.009 < se < 0.012
    assert rule.check([0.5, 0.88, 0.87], n_val=1000, n_classes=10) is None  # noise
    why = rule.check([0.5, 0.88, 0.70], n_val=1000, n_classes=10)
    assert why is not None and "fell 0.18 below its best 0.88" in why
    # A noisy history raises the bar: the same drop within its spread is no collapse.
    jumpy = [0.5, 0.8, 0.6, 0.85, 0.62, 0.84, 0.70]
    assert rule.check(jumpy) is None
    assert rule.check([0.5, 0.8, 0.81, 0.82, 0.5]) is not None
    with pytest.raises(ValueError, match="collapse k must be a finite number > 0, got 0"):
        CollapseRule(k=0)


def _run(tmp_path, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # lr x1, batch stay, dropout stay: only the safety net moves anything.
    ctl = Controller.load(
        forced_policy(tmp_path / "pol", lr=2, batch=1, dropout=1),
        optimizer=opt,
        model=model,
        budget_samples=10_000,
        n_classes=3,
        batch_size=64,
        **kw,
    )
    return model, opt, ctl


def test_controller_rolls_back_on_a_validation_loss_blow_up(tmp_path):
    model, opt, ctl = _run(tmp_path)
    ctl.start(val_loss=1.0, val_score=0.4)
    d = ctl.step(train_loss=0.9, val_loss=0.9, val_score=0.5, samples=100)
    assert not d.rolled_back
    d = ctl.step(train_loss=0.8, val_loss=130.0, val_score=0.5, samples=200)
    assert d.rolled_back and "validation loss 130" in d.events[0]
    assert d.lr == pytest.approx(1e-3 * 0.25)


def _last_decision(ctl, scores):
    """Start at 0.4, report ``scores`` one interval each; the last decision."""
    ctl.start(val_loss=1.0, val_score=0.4)
    for i, s in enumerate(scores):
        d = ctl.step(train_loss=0.5, val_loss=0.5, val_score=s, samples=100 * (i + 1))
    return d


def test_collapse_guard_is_on_by_default_and_restores_the_best_state(tmp_path, caplog):
    scores = [0.9, 0.92, 0.5]
    assert not _last_decision(_run(tmp_path, collapse=False)[2], scores).rolled_back
    d = _last_decision(_run(tmp_path, n_val=1000)[2], scores)  # the default: on
    assert d.rolled_back and "collapse" in d.events[0]
    # Without the validation size the noise is unknown until two changes were seen:
    # no verdict on a short history (a wobble near chance is not a collapse).
    assert not _last_decision(_run(tmp_path)[2], scores).rolled_back

    model, opt, ctl = _run(tmp_path, collapse=True, n_val=1000)
    ctl.start(val_loss=1.0, val_score=0.4)
    ctl.step(train_loss=0.5, val_loss=0.5, val_score=0.9, samples=100)
    ctl.step(train_loss=0.5, val_loss=0.5, val_score=0.92, samples=200)
    best = [p.detach().clone() for p in model.parameters()]
    best_lr = ctl.hp["lr"]
    with torch.no_grad():  # the run wanders off (a collapse), at a raised lr
        for p in model.parameters():
            p.add_(1.0)
    for g in opt.param_groups:
        g["lr"] = 4e-3
    with caplog.at_level(logging.WARNING, logger="rlhpo.controller"):
        d = ctl.step(train_loss=0.5, val_loss=0.6, val_score=0.5, samples=300)
    assert d.rolled_back and "collapse" in d.events[0] and "collapse" in ctl.events[-1]
    assert "collapse" in caplog.text
    for p, b in zip(model.parameters(), best, strict=True):
        assert torch.equal(p, b)
    assert d.lr == pytest.approx(best_lr * 0.5)
    # The cap holds for later decisions of the policy (lr x1 here; x2 would be capped too).
    d = ctl.step(train_loss=0.5, val_loss=0.5, val_score=0.93, samples=400)
    assert d.lr <= best_lr * 0.5 + 1e-12


def test_controller_load_leaves_the_global_rng_alone(tmp_path):
    path = forced_policy(tmp_path / "pol")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    Controller.load(path, budget_samples=100, metric="r2", batch_size=32)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_frozen_knob_is_never_written(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 3), nn.Dropout(0.3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctl = Controller.load(
        forced_policy(tmp_path / "pol"),  # dropout +0.1 every decision
        optimizer=opt,
        model=model,
        budget_samples=1000,
        n_classes=3,
        batch_size=64,
        freeze=("dropout",),
    )
    ctl.start(val_loss=1.0, val_score=0.4)
    ctl.step(train_loss=0.9, val_loss=0.9, val_score=0.5, samples=100)
    assert [m.p for m in model if isinstance(m, nn.Dropout)] == [0.1, 0.3]
    assert ctl.hp["lr"] > 1e-3  # the unfrozen knobs still move


def test_controller_takes_the_batch_size_from_the_loader_or_requires_it(tmp_path):
    path = forced_policy(tmp_path / "pol")
    loader = torch.utils.data.DataLoader(list(range(100)), batch_size=32)
    ctl = Controller.load(path, budget_samples=100, metric="r2", loader=loader)
    assert ctl.batch_size == 32
    with pytest.raises(ValueError, match="needs the run's starting batch_size"):
        Controller.load(path, budget_samples=100, metric="r2")


def test_lr_clipping_to_the_policy_space_warns_once(tmp_path, caplog):
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # above the space's 0.1
    with caplog.at_level(logging.WARNING, logger="rlhpo.controller"):
        ctl = Controller.load(
            forced_policy(tmp_path / "pol", lr=2, batch=1, dropout=1),
            optimizer=opt,
            model=model,
            budget_samples=10_000,
            n_classes=3,
            batch_size=64,
            apply=False,
        )
        ctl.start(val_loss=1.0, val_score=0.4)
        for i in range(3):
            ctl.step(train_loss=0.9, val_loss=0.9, val_score=0.5, samples=100 * (i + 1))
    warnings = [r for r in caplog.records if "clipped" in r.message or "outside" in r.message]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert np.isclose(ctl.hp["lr"], 0.1)


def test_env_collapse_guard_is_off_by_default_and_restores_the_best_state(write_suite):
    from rlhpo.env import HPOEnv

    kw = dict(tasks=["a"], budget_scale=1.0)
    path = write_suite()
    assert HPOEnv(path, **kw).collapse is None
    env = HPOEnv(path, collapse_k=3.0, **kw)
    env.reset(seed=0, options={"start": "default"})
    env.step(ActionCodec.NOOP)
    best = env._best
    assert best is not None
    # Make the next interval collapse: a huge lr on a plain run wrecks the score.
    real_train = env.trainee.train

    def wreck(n):
        with torch.no_grad():
            for p in env.trainee.model.parameters():
                p.mul_(0.0)
        return real_train(n)

    env.trainee.train = wreck
    obs, r, term, trunc, info = env.step(ActionCodec.NOOP)
    assert "collapse" in info and "below its best" in info["collapse"]
    assert info["val_norm_score"] == pytest.approx(best["score"])
    assert env._lr_cap == pytest.approx(best["lr_at_best"] * 0.5)
    assert info["hp"]["lr"] <= env._lr_cap + 1e-12
    with pytest.raises(ValueError, match="collapse k must be a finite number > 0, got -1"):
        HPOEnv(path, collapse_k=-1.0, **kw)


def test_collapse_needs_something_learned_to_protect():
    """A wobble near chance is not a collapse (a parity run before its phase
    transition: best 0.07, then -0.13, with noise ~0.05); a fall from a learned
    score is."""
    from rlhpo.safety import CollapseRule

    rule = CollapseRule()
    near_chance = [0.0, -0.05, -0.02, -0.01, 0.07, 0.07, -0.01, -0.13]
    assert rule.check(near_chance, n_val=600, n_classes=2) is None
    learned = [0.0, 0.5, 0.8, 0.9, 0.92, 0.91, 0.3]
    assert "fell" in rule.check(learned, n_val=600, n_classes=2)
