import math

import pytest
import torch

from rlhpo.trainees import build_trainee


def _params(tr):
    return torch.cat([p.detach().flatten() for p in tr.model.parameters()])


def test_same_seed_same_run_and_other_seed_differs(suite):
    spec = suite.task("digits-mlp")
    a, b, c = (build_trainee(spec, seed=s) for s in (1, 1, 2))
    for tr in (a, b, c):
        tr.train(2000)
    assert torch.equal(_params(a), _params(b))
    assert not torch.equal(_params(a), _params(c))


def test_runs_are_independent_of_global_rng_and_each_other(suite):
    spec = suite.task("digits-mlp")
    ref = build_trainee(spec, seed=3)
    ref.train(1000)
    ref.train(1000)
    x = build_trainee(spec, seed=3)
    y = build_trainee(spec, seed=4)
    x.train(1000)
    torch.manual_seed(123)  # someone else uses the global RNG in between
    y.train(1000)
    x.train(1000)
    assert torch.equal(_params(ref), _params(x))


def test_snapshot_restore_continues_exactly(suite):
    tr = build_trainee(suite.task("mnist1d-cnn"), seed=0)
    tr.train(500)
    snap = tr.snapshot()
    tr.set_hp(lr=0.05, batch_size=16, dropout=0.4)
    tr.train(700)
    after = _params(tr).clone()
    tr.restore(snap)
    assert tr.hp["batch_size"] == 64 and math.isclose(tr.hp["dropout"], 0.1)
    tr.set_hp(lr=0.05, batch_size=16, dropout=0.4)
    tr.train(700)
    assert torch.equal(after, _params(tr))
    assert tr.samples_seen == 500 + 700 + 700  # work done before the rollback still counts


def test_evaluate_val_by_default_and_test_only_on_request(suite):
    tr = build_trainee(suite.task("digits-mlp"), seed=0)
    v = tr.evaluate()
    t = tr.evaluate("test")
    assert set(v) == {"loss", "score"} and 0 <= v["score"] <= 1
    assert v != t
    with pytest.raises(ValueError, match="split must be"):
        tr.evaluate("holdout")


def test_non_finite_loss_stops_the_interval(suite):
    tr = build_trainee(suite.task("regression-mlp"), seed=0)
    with torch.no_grad():
        for p in tr.model.parameters():
            p.fill_(float("inf"))
    stats = tr.train(1000)
    assert stats.diverged and stats.steps == 0 and math.isnan(stats.train_loss)


def test_regression_metric_is_r2(suite):
    tr = build_trainee(suite.task("friedman-mlp"), seed=0, hp={"lr": 3e-3})
    before = tr.evaluate()["score"]
    tr.train(20000)
    after = tr.evaluate()["score"]
    assert before < 0.2 < after <= 1.0
