import math

import pytest
import torch
from torch import nn

from rlhpo.knobs import KnobError, SearchSpace, dropout_modules, set_dropout, set_learning_rate
from rlhpo.trainees import build_trainee

SPACE = SearchSpace(lr=(1e-5, 1e-1), batch_sizes=(16, 32, 64, 128), dropout=(0.0, 0.5))


def test_clip_never_accepts_out_of_bounds():
    assert SPACE.clip("lr", 10.0) == 1e-1
    assert SPACE.clip("lr", 1e-9) == 1e-5
    assert SPACE.clip("batch_size", 1000) == 128
    assert SPACE.clip("batch_size", 40) == 32
    assert SPACE.clip("dropout", -1) == 0.0
    with pytest.raises(KnobError, match="unknown knob 'beta3'"):
        SPACE.clip("beta3", 0.9)
    with pytest.raises(KnobError, match="knob 'momentum' is not in this space"):
        SPACE.clip("momentum", 0.9)
    with pytest.raises(KnobError, match="lr must be a number, got nan"):
        SPACE.clip("lr", float("nan"))


def test_lr_changes_every_group_and_survives_a_scheduler_step():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.2}], lr=0.1
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    opt.step()
    sched.step()  # multiplier now 1/2
    assert math.isclose(opt.param_groups[0]["lr"], 0.05)
    set_learning_rate(opt, 0.01, sched)
    assert all(math.isclose(g["lr"], 0.01) for g in opt.param_groups)
    opt.step()
    sched.step()  # multiplier 1/3: lr must follow the new level, not snap back
    assert math.isclose(opt.param_groups[0]["lr"], 0.01 * (1 / 3) / (1 / 2))
    assert math.isclose(opt.param_groups[1]["lr"], 0.01 * (1 / 3) / (1 / 2))


def test_trainee_lr_knob_survives_its_scheduler(suite):
    spec = suite.task("digits-mlp")
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s // 10))  # noqa: E731
    tr = build_trainee(spec, seed=0, scheduler=sched)
    tr.train(64 * 10)  # 10 steps: multiplier 0.5
    assert math.isclose(tr.hp["lr"], 5e-4)
    tr.set_hp(lr=4e-3)
    tr.train(64 * 10)  # another halving from the new level
    assert math.isclose(tr.hp["lr"], 2e-3)


def test_batch_size_changes_steps_not_samples(suite):
    spec = suite.task("digits-mlp")
    tr = build_trainee(spec, seed=0)
    tr.set_hp(batch_size=16)
    a = tr.train(1000)
    tr.set_hp(batch_size=128)
    b = tr.train(1000)
    assert a.samples == b.samples == 1000
    assert a.steps == math.ceil(1000 / 16) and b.steps == math.ceil(1000 / 128)
    assert tr.samples_seen == 2000 and tr.optimizer_steps == a.steps + b.steps


@pytest.mark.parametrize("task", ["mnist1d-cnn", "seq-gru", "seq-transformer"])
def test_dropout_reaches_every_module(suite, task):
    tr = build_trainee(suite.task(task), seed=0)
    mods = dropout_modules(tr.model)
    assert len(mods) >= 1
    tr.set_hp(dropout=0.37)
    assert all(m.p == 0.37 for m in mods)
    assert tr.hp["dropout"] == 0.37
    tr.set_hp(dropout=0.9)  # out of bounds: clipped to 0.5
    assert all(m.p == 0.5 for m in mods)


def test_transformer_dropout_changes_the_attention_too(suite):
    tr = build_trainee(suite.task("seq-transformer"), seed=0)
    set_dropout(tr.model, 0.3)
    cfg = tr.model.hf.config
    assert cfg.hidden_dropout_prob == 0.3 and cfg.attention_probs_dropout_prob == 0.3
    attn = tr.model.hf.bert.encoder.layer[0].attention.self
    assert attn.dropout.p == 0.3
    # Dropout actually acts: in train mode, two forward passes now differ.
    x = tr.data.x_val[:8]
    tr.model.train()
    with torch.no_grad():
        assert not torch.allclose(tr.model(x), tr.model(x))
    set_dropout(tr.model, 0.0)
    with torch.no_grad():
        assert torch.allclose(tr.model(x), tr.model(x))


def test_search_space_drives_optuna_suggestions():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        t = study.ask()
        hp = SPACE.suggest(t)
        assert all(SPACE.contains(k, v) for k, v in hp.items())
        study.tell(t, 0.0)
