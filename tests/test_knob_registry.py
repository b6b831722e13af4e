"""The knob registry: every consumer derives from it, and the opt-in knobs
(weight decay, momentum) work end to end."""

import numpy as np
import pytest
import torch
from torch import nn

from rlhpo.actions import ActionCodec
from rlhpo.env import HPOEnv
from rlhpo.knobs import KNOBS, REGISTRY, KnobError, LiveRun, SearchSpace
from rlhpo.observation import ObservationEncoder, encoder_class
from rlhpo.policy import PolicyNet, load_policy, save_policy
from tests.conftest import BASE_TASK

EXTRA = BASE_TASK.replace(
    "default = { lr = 1e-3, batch_size = 64, dropout = 0.1 }",
    "default = { lr = 1e-3, batch_size = 64, dropout = 0.1, weight_decay = 1e-3, momentum = 0.9 }",
).replace(
    "dropout = [0.0, 0.5] }",
    "dropout = [0.0, 0.5], weight_decay = [1e-5, 1e-1], momentum = [0.5, 0.99] }",
    1,
)


def test_required_knobs_and_registry_order():
    assert KNOBS == ("lr", "batch_size", "dropout")
    assert list(REGISTRY)[:3] == list(KNOBS)
    assert ActionCodec.NVEC == (5, 3, 3) and ActionCodec.NOOP == (2, 1, 1)
    with pytest.raises(KnobError, match="needs the knobs dropout"):
        SearchSpace(lr=(1e-4, 1e-1), batch_size=(32,))
    with pytest.raises(KnobError, match=r"weight_decay must lie in \[1e-08, 1\], got \[0.0, 2.0\]"):
        SearchSpace(lr=(1e-4, 1e-1), batch_size=(32,), dropout=(0, 0.5), weight_decay=[0.0, 2.0])


def test_space_derives_optuna_and_ray_domains():
    sp = SearchSpace(
        lr=(1e-4, 1e-1), batch_size=(32, 64), dropout=(0.0, 0.5), weight_decay=(1e-5, 1e-1)
    )
    calls = []

    class Trial:
        def suggest_float(self, name, lo, hi, log=False):
            calls.append((name, lo, hi, log))
            return lo

        def suggest_categorical(self, name, choices):
            calls.append((name, tuple(choices)))
            return choices[0]

    assert sp.suggest(Trial()) == {
        "lr": 1e-4,
        "batch_size": 32,
        "dropout": 0.0,
        "weight_decay": 1e-5,
    }
    assert calls == [
        ("lr", 1e-4, 1e-1, True),
        ("batch_size", (32, 64)),
        ("dropout", 0.0, 0.5, False),
        ("weight_decay", 1e-5, 1e-1, True),
    ]

    class Tune:
        def loguniform(self, lo, hi):
            return ("log", lo, hi)

        def uniform(self, lo, hi):
            return ("lin", lo, hi)

        def choice(self, xs):
            return ("choice", tuple(xs))

    assert sp.tune_mutations(Tune()) == {
        "lr": ("log", 1e-4, 1e-1),
        "batch_size": [32, 64],
        "dropout": ("lin", 0.0, 0.5),
        "weight_decay": ("log", 1e-5, 1e-1),
    }
    assert sp.tune_initial(Tune())["batch_size"] == ("choice", (32, 64))


def test_weight_decay_knob_spares_no_decay_groups():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.AdamW(
        [{"params": a.parameters()}, {"params": b.parameters(), "weight_decay": 0.0}],
        lr=1e-3,
        weight_decay=0.01,
    )
    wd = REGISTRY["weight_decay"]
    run = LiveRun(optimizer=opt)
    assert wd.read(run) == 0.01
    wd.write(run, 0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    with pytest.raises(KnobError, match="weight_decay must be a finite number >= 0, got -1"):
        wd.write(run, -1)


def test_momentum_knob_is_sgd_momentum_or_adam_beta1():
    m = REGISTRY["momentum"]
    p = [nn.Parameter(torch.zeros(2))]
    sgd = torch.optim.SGD(p, lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(p, lr=0.1, betas=(0.9, 0.999))
    m.write(LiveRun(optimizer=sgd), 0.8)
    m.write(LiveRun(optimizer=adam), 0.7)
    assert sgd.param_groups[0]["momentum"] == 0.8
    assert adam.param_groups[0]["betas"] == (0.7, 0.999)
    assert m.read(LiveRun(optimizer=adam)) == 0.7
    with pytest.raises(KnobError, match="momentum needs an optimizer with momentum or betas"):
        m.write(LiveRun(optimizer=torch.optim.Adagrad(p, lr=0.1)), 0.5)


def test_opt_in_knobs_run_through_env_trainee_and_policy(write_suite, tmp_path):
    env = HPOEnv(
        write_suite(EXTRA.replace('metric = "accuracy"', 'metric = "accuracy"\noptimizer = "sgd"'))
    )
    assert env.knobs == ("lr", "batch_size", "dropout", "weight_decay", "momentum")
    assert tuple(env.action_space.nvec) == (5, 3, 3, 3, 3)
    assert env.observation_space.shape == (18,)
    obs, info = env.reset(seed=0, options={"start": "default"})
    assert obs.shape == (18,)
    group = env.trainee.optimizer.param_groups[0]
    assert group["weight_decay"] == 1e-3 and group["momentum"] == 0.9
    # weight decay x4, momentum +0.05; the other knobs stay.
    obs, r, term, trunc, info = env.step([2, 1, 1, 2, 2])
    assert info["hp"]["weight_decay"] == pytest.approx(4e-3)
    assert info["hp"]["momentum"] == pytest.approx(0.95)
    assert group["weight_decay"] == pytest.approx(4e-3) and group["momentum"] == pytest.approx(0.95)
    # A policy file names its knobs; its network fits them.
    net = PolicyNet(obs_dim=18, nvec=tuple(env.action_space.nvec))
    pol = load_policy(save_policy(tmp_path / "p", net, knobs=env.knobs))
    assert pol.knobs == env.knobs
    assert pol.manifest["codec"]["nvec"] == [5, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="gives 18 for the knobs"):
        save_policy(tmp_path / "q", PolicyNet(), knobs=env.knobs)


def test_env_start_draw_is_unchanged_by_the_registry(write_suite):
    """The draw order (lr, batch size, dropout) and arithmetic of the old env."""
    import math

    from gymnasium.utils import seeding

    env = HPOEnv(write_suite())
    _, info = env.reset(seed=5)
    rng, _ = seeding.np_random(5)
    rng.integers(2**31 - 1)  # the run seed
    rng.integers(1)  # the task (one task)
    lr = float(math.exp(rng.uniform(math.log(1e-5), math.log(3e-2))))
    bs = [32, 64][int(rng.integers(2))]
    do = float(rng.uniform(0.0, 0.3))
    assert info["hp"] == {
        "lr": pytest.approx(lr, rel=1e-6),
        "batch_size": bs,
        "dropout": pytest.approx(do),
    }


def test_policies_with_the_required_knobs_keep_their_shapes():
    enc = ObservationEncoder(SearchSpace(lr=(1e-4, 1e-1), batch_size=(32,), dropout=(0.0, 0.5)))
    assert enc.size == ObservationEncoder.SIZE == 16
    from pathlib import Path

    root = Path(__file__).parents[1]
    dirs = [p.parent for p in root.glob("rlhpo/policies/*/manifest.json")]
    dirs += [p.parent for p in root.glob("experiments/transfer/policies/*/manifest.json")]
    assert len(dirs) >= 10
    for path in dirs:
        pol = load_policy(path)
        size = encoder_class(pol.obs_version).SIZE  # 16 (v1) or 21 (v2)
        assert pol.knobs == KNOBS and pol.net.obs_dim == size
        assert np.asarray(pol.act(np.zeros(size, np.float32))).shape == (3,)
