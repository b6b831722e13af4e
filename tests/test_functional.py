"""The torch.func batched backend against the unbatched Trainee, for every family.

Tolerances (measured on main's tasks, 3 intervals of 300 samples, lr up to 1e-2;
the tests use 160 samples for all but the MLP, to stay fast):
- dropout 0, exact Adam arithmetic: per-interval train loss within rel 1e-5
  (measured <= 2e-7 abs), validation loss within 1e-4 (measured <= 4e-5), weights
  within 1e-5 for GRU/MLP/CNN (measured 7e-7, 1e-7, 9e-6) and 1e-2 for the BERT
  transformer (measured 4.5e-3: at lr 1e-2 its float summation-order drift grows
  fastest). vmap's batched matmuls sum in another order than the module's, and
  the unrolled GRU/LSTM compute the gates in another order than torch's fused
  cell, so equality is to float rounding, not bitwise;
- dropout > 0, exact mode: each run draws from its own stream as nn.Dropout, so
  the same tolerances hold;
- dropout > 0, fast mode: other masks from the same distribution: statistical
  agreement.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import vmap

from rlhpo.tasks import load_suite
from rlhpo.trainees import build_trainee, task_data
from rlhpo.trainees.batched import BatchedTrainee, supports_batching
from rlhpo.trainees.functional import (
    FunctionalTrainee,
    UnrolledGRU,
    UnrolledLSTM,
    _drop,
    functional_copy,
    make_batched_trainee,
    supports_functional,
)
from rlhpo.vec_env import RunPool

FAMILIES = {  # model family -> a task of main's default suite
    "gru": "seq-gru",
    "transformer": "seq-transformer",
    "mlp": "wine-mlp",
    "cnn1d": "digits-cnn",
}
WEIGHT_TOL = {"gru": 1e-5, "transformer": 1e-2, "mlp": 1e-5, "cnn1d": 1e-5}


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


HPS = [
    {"lr": 3e-3, "batch_size": 32, "dropout": 0.0},
    {"lr": 1e-3, "batch_size": 64, "dropout": 0.0},
    {"lr": 1e-2, "batch_size": 32, "dropout": 0.0},
]
# Knob changes between intervals: lr and batch size move, groups re-form.
CHANGES = [{}, {"lr": 5e-4, "batch_size": 64}, {"batch_size": 16}]


def _train_both(spec, hps, intervals=3, samples=300, **kw):
    group = FunctionalTrainee(spec, exact=True, **kw)
    runs = [group.add(h, seed=s) for s, h in enumerate(hps)]
    trs = [build_trainee(spec, h, seed=s) for s, h in enumerate(hps)]
    for it in range(intervals):
        for i, (r, t) in enumerate(zip(runs, trs, strict=True)):
            ch = CHANGES[(it + i) % len(CHANGES)] if it else {}
            r.set_hp(**ch)
            t.set_hp(**ch)
        got = group.train([(r, samples) for r in runs])
        want = [t.train(samples) for t in trs]
        for a, b in zip(got, want, strict=True):
            assert (a.samples, a.steps, a.diverged) == (b.samples, b.steps, b.diverged)
            assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        n_val = group.data.x_val.shape[0]
        for a, b in zip(group.evaluate(runs), [t.evaluate() for t in trs], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
            assert abs(a["score"] - b["score"]) <= 1.5 / n_val  # one sample at most
    return runs, trs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_runs_match_unbatched_ones(suite, family):
    spec = suite.task(FAMILIES[family])
    assert spec.model == family
    # Vmapped conv, GRU and attention are the slow ones: fewer samples, same checks.
    runs, trs = _train_both(spec, HPS, samples=300 if family == "mlp" else 160)
    for r, t in zip(runs, trs, strict=True):
        diff = (_flat(r.to_module().parameters()) - _flat(t.model.parameters())).abs().max()
        assert float(diff) < WEIGHT_TOL[family]


@pytest.mark.parametrize("family", ["gru", "mlp"])
def test_exact_mode_replays_the_trainees_dropout(suite, family):
    spec = suite.task(FAMILIES[family])
    hps = [{**h, "dropout": p} for h, p in zip(HPS, (0.2, 0.0, 0.45), strict=True)]
    runs, trs = _train_both(spec, hps, intervals=2)
    for r, t in zip(runs, trs, strict=True):
        diff = (_flat(r.to_module().parameters()) - _flat(t.model.parameters())).abs().max()
        assert float(diff) < WEIGHT_TOL[family]


def test_chunks_do_not_change_results(suite):
    spec = suite.task("seq-gru")
    a, _ = _train_both(spec, HPS, intervals=1, max_chunk_runs=1)
    b, _ = _train_both(spec, HPS, intervals=1, max_chunk_runs=32)
    for r, s in zip(a, b, strict=True):
        torch.testing.assert_close(_flat(r.params), _flat(s.params), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first", [True, False])
def test_unrolled_rnns_equal_torchs(kind, batch_first):
    torch.manual_seed(0)
    rnn = kind(5, 7, num_layers=2, batch_first=batch_first)
    unrolled = (UnrolledLSTM if kind is nn.LSTM else UnrolledGRU)(rnn)
    x = torch.randn(3, 4, 5)
    ref_out, ref_state = rnn(x)
    out, state = unrolled(x)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    for a, b in zip(
        state if kind is nn.LSTM else [state],
        ref_state if kind is nn.LSTM else [ref_state],
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the same parameters (names and tensors), and the same gradients
    assert [n for n, _ in unrolled.named_parameters()] == [n for n, _ in rnn.named_parameters()]
    g_ref = torch.autograd.grad(ref_out.square().sum(), list(rnn.parameters()))
    g = torch.autograd.grad(out.square().sum(), list(unrolled.parameters()))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # an initial state and an unbatched input, as nn.GRU/nn.LSTM take them
    h0 = torch.randn(2, 7)
    hx = (h0, torch.randn(2, 7)) if kind is nn.LSTM else h0
    torch.testing.assert_close(unrolled(x[0], hx)[0], rnn(x[0], hx)[0], atol=1e-6, rtol=1e-5)


def test_per_run_dropout_has_nn_dropout_statistics():
    ps = torch.tensor([0.0, 0.1, 0.3, 0.5])
    x = torch.ones(4, 64, 200)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = vmap(_drop, randomness="different")(x, ps)
    n = m[0].numel()
    for i, p in enumerate(ps.tolist()):
        assert set(torch.unique(m[i]).tolist()) <= {0.0, float(torch.tensor(1.0) / (1 - p))}
        keep = float((m[i] > 0).float().mean())
        assert abs(keep - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_fast_mode_with_dropout_agrees_statistically(suite):
    spec = suite.task("digits-mlp")
    hp = {"lr": 3e-3, "batch_size": 32, "dropout": 0.4}
    seeds = list(range(8))
    group = FunctionalTrainee(spec)
    runs = [group.add(hp, seed=s) for s in seeds]
    group.train([(r, 3000) for r in runs])
    fast = np.array([e["loss"] for e in group.evaluate(runs)])
    ref = []
    for s in seeds:
        t = build_trainee(spec, hp, seed=s)
        t.train(3000)
        ref.append(t.evaluate()["loss"])
    ref = np.array(ref)
    assert not np.allclose(fast, ref)  # other masks...
    spread = math.sqrt((fast.var(ddof=1) + ref.var(ddof=1)) / len(seeds))
    assert abs(fast.mean() - ref.mean()) < 4 * spread + 0.02  # ...same distribution


def test_fast_mode_dropout_acts_per_run_and_is_reproducible(suite):
    spec = suite.task("seq-gru")

    def train(ps):
        group = FunctionalTrainee(spec)
        runs = [group.add({"dropout": p, "batch_size": 32}, seed=0) for p in ps]
        return [s.train_loss for s in group.train([(r, 96) for r in runs])]

    outer = torch.random.get_rng_state()
    a = train([0.0, 0.3, 0.3])
    assert torch.equal(torch.random.get_rng_state(), outer)  # the caller's RNG untouched
    assert a == train([0.0, 0.3, 0.3])
    ref = build_trainee(spec, {"dropout": 0.0, "batch_size": 32}, seed=0).train(96)
    assert a[0] == pytest.approx(ref.train_loss, rel=1e-5)  # p = 0: no dropout at all
    assert a[1] != a[2]  # same seed and p, other masks: dropout is drawn per run
    assert abs(a[1] - a[0]) > 1e-4


def test_routing_and_bad_inputs(suite):
    for family, task in FAMILIES.items():
        assert supports_batching(suite.task(task)), family
        assert supports_functional(suite.task(task)), family
    assert type(make_batched_trainee(suite.task("wine-mlp"))) is BatchedTrainee
    assert type(make_batched_trainee(suite.task("seq-gru"))) is FunctionalTrainee
    pool = RunPool()
    assert isinstance(pool.new_run(suite.task("seq-transformer"), {}, 0).group, FunctionalTrainee)
    # Benchmark v2: a task weight decay is batched (tests/test_batched_decay.py), and
    # a language model's per-token targets (test_decoder_lm_matches_the_trainee).
    v2 = load_suite("default")
    tasks = [v2.task(t) for t in (*v2.train, *v2.test)]
    gru = next(t for t in tasks if t.model == "gru")
    assert gru.weight_decay is not None and supports_batching(gru)
    lm = next(t for t in tasks if t.model == "decoder")
    assert supports_functional(lm)
    # Per-position targets of a regression task are not a loss the backend knows.
    assert not supports_functional(dataclasses.replace(lm, metric="r2"))
    with pytest.raises(ValueError, match="max_chunk_runs must be >= 1, got 0"):
        FunctionalTrainee(suite.task("seq-gru"), max_chunk_runs=0)
    with pytest.raises(ValueError, match="is bidirectional"):
        functional_copy(nn.Sequential(nn.GRU(3, 4, bidirectional=True)))
    with pytest.raises(ValueError, match="updates running statistics"):
        functional_copy(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    with pytest.raises(ValueError, match="RNN.*no unrolled equivalent"):
        functional_copy(nn.Sequential(nn.RNN(3, 4)))


@pytest.mark.parametrize("task", ["decoder-01-lm_copy", "decoder-00-lm_reverse"])
def test_decoder_lm_matches_the_trainee(task):
    """Per-token targets (-100: not scored): the Trainee's loss, next-token accuracy."""
    spec = load_suite("default").task(task)
    assert spec.model == "decoder" and task_data(spec).y_train.dim() == 2
    assert (task_data(spec).y_train == -100).any()  # prompt positions are ignored
    runs, trs = _train_both(spec, HPS, intervals=2, samples=160)
    for r, t in zip(runs, trs, strict=True):
        diff = (_flat(r.to_module().parameters()) - _flat(t.model.parameters())).abs().max()
        assert float(diff) < WEIGHT_TOL["transformer"]
        a, b = r.evaluate(), t.evaluate()
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)  # token-weighted accuracy
        assert 0.0 <= a["score"] <= 1.0


@pytest.mark.parametrize("family", ["gru", "transformer"])
def test_snapshot_restore_and_fork_follow_the_trainee(suite, family):
    # Exact mode: each run has its own dropout stream, so a restored run and a fork
    # replay the unbatched Trainee's continuation (weights to the family's tolerance).
    spec = suite.task(FAMILIES[family])
    hp = {"lr": 3e-3, "batch_size": 32, "dropout": 0.2}
    group = FunctionalTrainee(spec, exact=True)
    run, tr = group.add(hp, seed=4), build_trainee(spec, hp, seed=4)
    for x in (run, tr):
        x.train(96)
    snaps = run.snapshot(), tr.snapshot()
    for x in (run, tr):
        x.set_hp(lr=1e-2, dropout=0.0)
        x.train(64)
        x.restore(snaps[0] if x is run else snaps[1])
    fork = run.fork(1)[0]
    got = group.train([(run, 96), (fork, 96)])
    want = tr.train(96)
    assert got[0].batch_losses == got[1].batch_losses
    assert got[0].batch_losses == pytest.approx(want.batch_losses, rel=1e-5)
    for r in (run, fork):
        diff = (_flat(r.to_module().parameters()) - _flat(tr.model.parameters())).abs().max()
        assert float(diff) < WEIGHT_TOL[family]
    assert run.samples_seen == tr.samples_seen == 256 and fork.samples_seen == 256


@pytest.mark.parametrize("family", ["gru", "transformer"])
def test_evaluation_runs_the_tasks_own_module(suite, family):
    # Evaluation calls the task's own module run by run (fused GRU, fused attention),
    # so its outputs equal the Trainee's bitwise; the vmapped copy's attention summed
    # in another order (1.3e-8 apart on seq-transformer).
    spec = suite.task(FAMILIES[family])
    group = FunctionalTrainee(spec)
    runs = [group.add({"dropout": 0.3}, seed=s) for s in (1, 2)]
    group.train([(r, 64) for r in runs])
    x = group.data.x_val
    P = [torch.stack(ps) for ps in zip(*(r.params for r in runs), strict=True)]
    out = group.net.forward(P, x, shared=True)
    for i, (r, ev) in enumerate(zip(runs, group.evaluate(runs), strict=True)):
        tr = build_trainee(spec, {"dropout": 0.3}, seed=r.seed)
        group.net.load_into(tr.model, r.params)
        assert ev == tr.evaluate()
        with torch.no_grad():
            assert torch.equal(out[i], tr.model.eval()(x))


def test_dropout_modules_need_no_per_op_mode(suite, monkeypatch):
    # nn.Dropout sites read the run's p themselves, so after the first pass a model
    # without functional dropout or attention trains without the TorchFunctionMode
    # (its Python call on every op cost a third of a 5-run GRU step), with the same masks.
    from rlhpo.trainees.functional import _RunDropout

    spec = suite.task("seq-gru")

    def losses():
        group = FunctionalTrainee(spec)
        runs = [group.add({"dropout": p, "batch_size": 32}, seed=0) for p in (0.0, 0.3)]
        first = [s.train_loss for s in group.train([(r, 64) for r in runs])]
        calls = []
        orig = _RunDropout.__torch_function__

        def counted(self, *a, **k):
            calls.append(1)
            return orig(self, *a, **k)

        monkeypatch.setattr(_RunDropout, "__torch_function__", counted)
        second = [s.train_loss for s in group.train([(r, 64) for r in runs])]
        monkeypatch.undo()
        return first, second, len(calls)

    first, second, calls = losses()
    assert calls == 0
    assert first[1] != pytest.approx(first[0], rel=1e-4)  # dropout acted on the second run
    assert (first, second) == losses()[:2]  # reproducible masks


def test_lone_runs_and_lstms_train_through_the_tasks_own_module(monkeypatch):
    # vmap gains nothing for a lockstep group of one run and the unrolled LSTM loses
    # to nn.LSTM at every size measured: those train run by run through the fused
    # module (throughput_guard_families.md), and still match the Trainee.
    import rlhpo.trainees.functional as functional

    suite = load_suite("default")

    def no_vmap(*a, **k):
        raise AssertionError("vmap called")

    for task, n_runs in (("gru-00-sequences", 1), ("lstm-00-sequences", 2)):
        spec = suite.task(task)
        group = FunctionalTrainee(spec)
        hp = {"dropout": 0.0, "batch_size": 32}
        runs = [group.add(hp, seed=s) for s in range(n_runs)]
        monkeypatch.setattr(functional, "vmap", no_vmap)
        got = group.train([(r, 96) for r in runs])
        monkeypatch.undo()
        for s, (r, st) in enumerate(zip(runs, got, strict=True)):
            tr = build_trainee(spec, hp, seed=s)
            assert st.train_loss == pytest.approx(tr.train(96).train_loss, rel=1e-5)
            diff = (_flat(r.to_module().parameters()) - _flat(tr.model.parameters())).abs().max()
            assert float(diff) < WEIGHT_TOL["gru"]
