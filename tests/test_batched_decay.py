"""Per-run weight decay and momentum in the batched optimizer, against the Trainee.

Benchmark v2 gives every task a weight decay and draws its optimizer from Adam
(L2 added to the gradient), AdamW (decoupled) and SGD with momentum; the opt-in
``weight_decay`` and ``momentum`` knobs change them while a run trains. Batched
runs must follow ``torch.optim`` exactly as the Trainee uses it. Tolerances are
tests/test_functional.py's (exact mode, dropout 0: train loss rel 1e-5,
validation loss 1e-4, weights 1e-5; measured <= 3e-6 on these tasks) and
tests/test_batched.py's for fast mode (fused Adam: 1e-4).
"""

import dataclasses

import pytest
import torch

from rlhpo.knobs import SearchSpace
from rlhpo.tasks import load_suite
from rlhpo.trainees import build_trainee
from rlhpo.trainees.batched import BatchedTrainee, supports_batching
from rlhpo.trainees.functional import FunctionalTrainee, make_batched_trainee

# v2 train tasks: one per optimizer, the stacked backend and torch.func both covered.
TASKS = {
    "adam": "resmlp-01-digits",
    "adamw": "mlp-00-wine",
    "sgd": "mlp-03-make_classification",
}
HPS = [
    {"lr": 3e-3, "batch_size": 32, "dropout": 0.0},
    {"lr": 1e-3, "batch_size": 64, "dropout": 0.0},
]


@pytest.fixture(scope="module")
def v2():
    return load_suite("default")


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def _with_knobs(spec):
    """``spec`` whose space also has the weight_decay and momentum knobs."""
    bounds = {**dict(spec.space._bounds), "weight_decay": (1e-5, 1e-1), "momentum": (0.0, 0.99)}
    default = {**spec.default, "weight_decay": 1e-3, "momentum": 0.9}
    return dataclasses.replace(spec, space=SearchSpace(bounds), default=default)


def _train_both(spec, hps, changes, exact=True, samples=200):
    group = make_batched_trainee(spec, exact=exact)
    runs = [group.add(h, seed=s) for s, h in enumerate(hps)]
    trs = [build_trainee(spec, h, seed=s) for s, h in enumerate(hps)]
    for change in changes:
        for r, t, ch in zip(runs, trs, change, strict=True):
            assert r.set_hp(**ch) == t.set_hp(**ch)
        got = group.train([(r, samples) for r in runs])
        want = [t.train(samples) for t in trs]
        for a, b in zip(got, want, strict=True):
            assert (a.samples, a.steps, a.diverged) == (b.samples, b.steps, b.diverged)
            assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
    for a, b in zip(group.evaluate(runs), [t.evaluate() for t in trs], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4, rel=1e-6)
    return runs, trs, group


def _weight_gap(runs, trs) -> float:
    return max(
        float((_flat(r.to_module().parameters()) - _flat(t.model.parameters())).abs().max())
        for r, t in zip(runs, trs, strict=True)
    )


@pytest.mark.parametrize("optimizer", sorted(TASKS))
def test_task_weight_decay_matches_the_trainee(v2, optimizer):
    spec = v2.task(TASKS[optimizer])
    assert spec.optimizer == optimizer and spec.weight_decay > 0
    assert supports_batching(spec)
    # A decay large enough to move the weights visibly within the test's steps.
    spec = dataclasses.replace(spec, weight_decay=0.05)
    runs, trs, group = _train_both(spec, HPS, [[{}, {}]] * 2)
    assert _weight_gap(runs, trs) < 1e-5
    # ... and the decay acted: without it the same runs end elsewhere.
    plain = dataclasses.replace(spec, weight_decay=0.0)
    other, _, _ = _train_both(plain, HPS, [[{}, {}]] * 2)
    assert _weight_gap(other, trs) > 1e-4


@pytest.mark.parametrize("optimizer", sorted(TASKS))
def test_weight_decay_and_momentum_knobs_match_the_trainee(v2, optimizer):
    spec = _with_knobs(v2.task(TASKS[optimizer]))
    hps = [HPS[0], {**HPS[1], "weight_decay": 0.05, "momentum": 0.8}]
    # Knob changes between intervals, per run; momentum 0 leaves SGD's buffer alone.
    changes = [
        [{}, {}],
        [{"weight_decay": 0.02, "momentum": 0.0}, {"weight_decay": 1e-4}],
        [{"weight_decay": 1e-4, "momentum": 0.95}, {"momentum": 0.5, "lr": 2e-3}],
    ]
    runs, trs, _ = _train_both(spec, hps, changes)
    assert _weight_gap(runs, trs) < 1e-5
    assert runs[0].hp["weight_decay"] == pytest.approx(1e-4)
    assert runs[1].hp["momentum"] == pytest.approx(0.5)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fast_fused_adam_applies_per_run_decay_and_beta1(v2, optimizer):
    spec = _with_knobs(dataclasses.replace(v2.task("mlp-02-digits"), optimizer=optimizer))
    hps = [HPS[0], {**HPS[1], "weight_decay": 0.05, "momentum": 0.8}]
    changes = [[{}, {}], [{"weight_decay": 0.02, "momentum": 0.7}, {"weight_decay": 1e-4}]]
    runs, trs, group = _train_both(spec, hps, changes, exact=False)
    assert group._fused
    assert _weight_gap(runs, trs) < 1e-4


def test_every_v2_task_is_batched(v2):
    tasks = [v2.task(t) for t in (*v2.train, *v2.test)]
    assert all(t.weight_decay is None or t.weight_decay > 0 for t in tasks)
    for t in tasks:
        assert supports_batching(t), t.name
        assert supports_batching(_with_knobs(t)), t.name
    assert type(make_batched_trainee(v2.task("mlp-00-wine"))) is BatchedTrainee
    assert type(make_batched_trainee(v2.task("gru-01-parity"))) is FunctionalTrainee
