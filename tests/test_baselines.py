"""Baselines: single runs match the env, the plateau controller's rules, schedules,
Optuna studies (seeding, resume, pruned-trial accounting) and PBT."""

from __future__ import annotations

import math

import optuna
import pytest

from rlhpo.actions import ActionCodec
from rlhpo.baselines import (
    CosineDecay,
    PlateauController,
    StepDecay,
    WarmupCosine,
    optuna_study,
    planned_steps,
    run_single,
    run_study,
    schedule_for,
    trial_seed,
)
from rlhpo.env import HPOEnv, run_seed_for
from rlhpo.knobs import SearchSpace
from rlhpo.observation import MetricHistory
from rlhpo.tasks import load_suite
from rlhpo.trainees import build_trainee


@pytest.fixture(scope="module")
def tiny():
    return load_suite("tiny")


def test_static_run_is_the_env_episode_with_noop_actions(tiny):
    spec = tiny.task("bc-mlp")
    out = run_single(spec, dict(spec.default), run_seed_for(3))
    env = HPOEnv(tiny, split="test", tasks=["bc-mlp"])
    _, info = env.reset(seed=3, options={"task": "bc-mlp", "start": "default"})
    scores = [info["val_norm_score"]]
    done = False
    while not done:
        _, _, done, _, info = env.step(ActionCodec.NOOP)
        scores.append(info["val_norm_score"])
    assert [r["norm_val_score"] for r in out.trace] == pytest.approx(scores)
    assert out.samples == info["samples"] == spec.budget_samples
    assert out.optimizer_steps == info["optimizer_steps"]
    assert out.test_score == pytest.approx(env.test_score()["score"])
    assert out.wall_time >= out.train_time > 0


def _feed(ctl: PlateauController, space: SearchSpace, recs, hp):
    """Record each (val_score, val_loss, train_loss) and let the controller decide."""
    h = MetricHistory()
    h.record(val_loss=2.0, val_score=0.0, train_loss=None, hp=hp, budget_fraction=0.0)
    for i, (score, vloss, tloss) in enumerate(recs, start=1):
        h.record(val_loss=vloss, val_score=score, train_loss=tloss, hp=hp, budget_fraction=i / 20)
        hp = ctl.decide(h, hp)
    return hp


SPACE = SearchSpace(lr=(1e-5, 1e-1), batch_sizes=(16, 32, 64, 128), dropout=(0.0, 0.5))
HP = {"lr": 1e-3, "batch_size": 64, "dropout": 0.1}


def test_plateau_raises_lr_after_a_new_best_and_caps_it():
    ctl = PlateauController(SPACE)
    hp = _feed(ctl, SPACE, [(0.3, 1.5, 1.6)], dict(HP))
    assert hp["lr"] == pytest.approx(1.5e-3) and ctl.events == [(1, "lr_up")]
    ctl = PlateauController(SPACE, max_lr=0.02)
    hp = _feed(ctl, SPACE, [(0.3, 1.5, 1.6)], {**HP, "lr": 0.018})
    assert hp["lr"] == pytest.approx(0.02)


def test_plateau_halves_lr_after_patience_intervals_without_a_new_best():
    ctl = PlateauController(SPACE, patience=2)
    hp = _feed(ctl, SPACE, [(0.5, 1.0, 1.0), (0.5, 0.9, 0.9), (0.49, 0.8, 0.8)], dict(HP))
    assert [e for _, e in ctl.events] == ["lr_up", "lr_down_plateau"]
    assert hp["lr"] == pytest.approx(1e-3 * 1.5 * 0.5)


def test_plateau_halves_lr_at_once_on_a_drop():
    ctl = PlateauController(SPACE, drop=0.1)
    hp = _feed(ctl, SPACE, [(0.6, 1.0, 1.0), (0.4, 0.9, 0.9)], dict(HP))
    assert ctl.events[-1] == (2, "lr_down_drop")
    assert hp["lr"] == pytest.approx(1e-3 * 1.5 * 0.5)


def test_plateau_grows_batch_on_a_training_loss_plateau():
    ctl = PlateauController(SPACE, loss_patience=3, patience=10)
    # Training loss stops improving after the first interval; val keeps a tiny gain.
    recs = [(0.5, 1.0, 1.0), (0.5, 1.0, 0.995), (0.5, 1.0, 0.999), (0.5, 1.0, 0.998)]
    hp = _feed(ctl, SPACE, recs, dict(HP))
    assert (4, "batch_up") in ctl.events
    assert hp["batch_size"] == 128
    # At the largest size it stays there and records nothing.
    ctl = PlateauController(SPACE, loss_patience=3, patience=10)
    hp = _feed(ctl, SPACE, recs, {**HP, "batch_size": 128})
    assert hp["batch_size"] == 128 and "batch_up" not in [e for _, e in ctl.events]


def test_plateau_raises_dropout_when_the_gap_widens():
    ctl = PlateauController(SPACE, patience=10)
    # log(val/train) goes from ~0.1 to ~0.7: the model starts to overfit.
    hp = _feed(ctl, SPACE, [(0.5, 0.55, 0.5), (0.55, 0.6, 0.3)], dict(HP))
    assert (2, "dropout_up") in ctl.events
    assert hp["dropout"] == pytest.approx(0.2)


def test_plateau_controller_drives_a_run(tiny):
    spec = tiny.task("bc-mlp")
    ctl = PlateauController(spec.space)
    out = run_single(spec, dict(spec.default), run_seed_for(0), controller=ctl)
    assert out.samples == spec.budget_samples and ctl.events
    lrs = [r["lr"] for r in out.trace]
    ups = sum(e == "lr_up" for _, e in ctl.events)
    assert (lrs[-1] > lrs[0]) == (ups > 0 and lrs[-1] != lrs[0])


def test_schedule_shapes():
    assert CosineDecay(10)(0) == 1.0 and CosineDecay(10)(5) == pytest.approx(0.5)
    assert CosineDecay(10)(10) == pytest.approx(0.0) and CosineDecay(10)(15) == pytest.approx(0.0)
    s = StepDecay(100)
    assert (s(49), s(50), s(75)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))
    w = WarmupCosine(100)
    assert w(0) == pytest.approx(0.04) and w(10) == pytest.approx(1.0)
    assert w(5) == pytest.approx(0.52) and w(100) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="'linear'"):
        schedule_for("linear", None, 64)


def test_schedule_runs_its_planned_steps_and_ends_at_zero(tiny):
    spec = tiny.task("friedman-mlp")
    for kind, end in (("cosine", 0.0), ("step", 0.01), ("warmup-cosine", 0.0)):
        out = run_single(
            spec, dict(spec.default), run_seed_for(0), scheduler=schedule_for(kind, spec, 64)
        )
        assert out.optimizer_steps == planned_steps(spec, 64)
        assert out.trace[-1]["lr"] == pytest.approx(end * spec.default["lr"], abs=1e-12)


def test_schedule_survives_an_lr_change(tiny):
    spec = tiny.task("bc-mlp")
    sched = schedule_for("cosine", spec, 64)
    tr = build_trainee(spec, dict(spec.default), seed=0, scheduler=sched)
    total = planned_steps(spec, 64)
    tr.train(spec.interval_samples)
    tr.set_hp(lr=tr.hp["lr"] * 4)  # the user (or a policy) moves the level mid-run
    tr.train(spec.interval_samples)
    step = tr.optimizer_steps
    expected = 4 * spec.default["lr"] * CosineDecay(total)(step)
    assert tr.hp["lr"] == pytest.approx(expected, rel=1e-6)


def test_trial_seeds_are_deterministic_and_distinct():
    assert trial_seed(0, 3) == trial_seed(0, 3)
    assert len({trial_seed(s, k) for s in range(4) for k in range(20)}) == 80


def test_optuna_study_picks_by_validation_and_is_seeded(tiny, tmp_path):
    spec = tiny.task("bc-mlp")
    a = run_study(spec, 7, 3, storage=f"sqlite:///{tmp_path}/a.db", study_name="s")
    b = run_study(spec, 7, 3, storage=f"sqlite:///{tmp_path}/b.db", study_name="s")
    assert [t.hp for t in a.trials] == [t.hp for t in b.trials]
    assert [t.val_norm for t in a.trials] == [t.val_norm for t in b.trials]
    assert a.best.val_norm == max(t.val_norm for t in a.trials)
    assert a.samples == 3 * spec.budget_samples and a.n_complete == 3
    for t in a.trials:  # hp from the shared search space, test scores kept for reporting
        assert spec.space.contains("lr", t.hp["lr"]) and t.hp["batch_size"] in (16, 32, 64, 128)
        assert t.test_score is not None and len(t.val_trace) == spec.intervals


def test_optuna_study_resumes_and_charges_a_killed_trial(tiny, tmp_path):
    spec = tiny.task("bc-mlp")
    url = f"sqlite:///{tmp_path}/r.db"
    first = run_study(spec, 0, 2, storage=url, study_name="s")
    assert first.found == 0 and len(first.trials) == 2
    # A run killed mid-trial leaves a RUNNING trial that consumed some samples.
    study = optuna.load_study(study_name="s", storage=url)
    t = study.ask()
    t.set_user_attr("cost", {"samples": 300, "optimizer_steps": 5, "wall_time": 0.1})
    again = run_study(spec, 0, 3, storage=url, study_name="s")
    assert again.found == 2
    # The killed trial runs again in place and is charged for both attempts.
    assert [t.state for t in again.trials] == ["COMPLETE"] * 3
    assert again.samples == 3 * spec.budget_samples + 300


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_resumed_study_gives_what_an_uninterrupted_one_gives(tiny, tmp_path, sampler):
    spec = tiny.task("bc-mlp")
    kw = dict(study_name="s", sampler=sampler)
    whole = run_study(spec, 4, 3, storage=f"sqlite:///{tmp_path}/w.db", **kw)
    url = f"sqlite:///{tmp_path}/r.db"
    run_study(spec, 4, 1, storage=url, **kw)
    # A process killed in trial 1 (in a fresh process: the sampler's stream restarts)
    # after it drew its hyperparameters and reported one interval.
    study = optuna.load_study(study_name="s", storage=url)
    study.sampler = optuna_study.make_sampler(sampler, trial_seed(4, 1), 3)
    t = study.ask()
    spec.space.suggest(t)
    t.report(0.0, step=1)
    resumed = run_study(spec, 4, 3, storage=url, **kw)
    assert [t.number for t in resumed.trials] == [t.number for t in whole.trials] == [0, 1, 2]
    assert [t.hp for t in resumed.trials] == [t.hp for t in whole.trials]
    assert [t.val_norm for t in resumed.trials] == [t.val_norm for t in whole.trials]
    assert resumed.best.number == whole.best.number


def test_trial_training_seed_follows_the_hyperparameters():
    seed_of = optuna_study.params_seed
    hp = {"lr": 1e-3, "batch_size": 32, "dropout": 0.1}
    assert seed_of(0, hp) == seed_of(0, dict(reversed(hp.items())))
    assert seed_of(0, hp) != seed_of(1, hp)
    assert seed_of(0, hp) != seed_of(0, {**hp, "lr": 2e-3})


def test_pruned_trials_count_what_they_consumed(tiny, tmp_path, monkeypatch):
    spec = tiny.task("bc-mlp")
    # A pruner that stops every trial after its second interval.
    monkeypatch.setattr(
        optuna_study,
        "make_pruner",
        lambda kind, intervals: optuna.pruners.ThresholdPruner(lower=2.0, n_warmup_steps=2),
    )
    st = run_study(
        spec, 0, 2, storage=f"sqlite:///{tmp_path}/p.db", study_name="s", pruner="median"
    )
    assert [t.state for t in st.trials] == ["PRUNED", "PRUNED"] and st.best is None
    assert st.samples == 2 * 2 * spec.interval_samples
    assert all(t.intervals == 2 and t.wall_time > 0 for t in st.trials)


@pytest.mark.parametrize("kind", ["median", "hyperband"])
def test_real_pruners_are_built_over_the_run_intervals(kind):
    p = optuna_study.make_pruner(kind, 20)
    assert isinstance(p, (optuna.pruners.MedianPruner, optuna.pruners.HyperbandPruner))
    with pytest.raises(ValueError, match="'sometimes'"):
        optuna_study.make_pruner("sometimes", 20)


@pytest.mark.slow
def test_pbt_spends_population_times_one_budget(tiny):
    from rlhpo.baselines.pbt import run_pbt

    spec = tiny.task("bc-mlp")
    out = run_pbt(spec, seed=0, population=2)
    assert out.samples == 2 * spec.budget_samples
    assert len(out.members) == 2 and out.best.val_norm == max(m.val_norm for m in out.members)
    assert all(len(m.trace) == spec.intervals for m in out.members)
    assert out.best.test_score is not None and math.isfinite(out.best.test_score)
    assert out.wall_time > out.train_time


def test_pbt_member_trains_saves_restores_and_takes_new_knobs(tiny):
    """The PBT member's logic without starting Ray (the full run is a slow test)."""
    tune = pytest.importorskip("ray.tune")
    from rlhpo.baselines.pbt import _member_class

    spec = tiny.task("bc-mlp")
    member = tune.with_parameters(_member_class(), spec=spec, seed=0)
    m = member(config={"member": 0, "lr": 0.01, "batch_size": 32, "dropout": 0.1})
    try:
        r1 = m.train()
        assert r1["step_samples"] == spec.interval_samples and r1["hp_batch_size"] == 32
        ck = m.save()
        r2 = m.train()
        m.restore(ck)  # back to the end of interval 1: the same interval 2 again
        assert m.train()["norm_val_score"] == r2["norm_val_score"]
        # Exploit: a checkpoint continues with this member's (perturbed) knobs.
        m.reset({"member": 1, "lr": 0.002, "batch_size": 64, "dropout": 0.2})
        m.restore(ck)
        assert m.trainee.hp == {"lr": 0.002, "batch_size": 64, "dropout": pytest.approx(0.2)}
        last = [m.train() for _ in range(spec.intervals - 1)][-1]
        assert last["training_iteration"] == spec.intervals and "test_score" in last
    finally:
        m.stop()
