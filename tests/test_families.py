"""Task families, the default (v2) suite, its held-out split and dataset/model caps."""

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from rlhpo.cli import app
from rlhpo.tasks import SpecError, load_suite
from rlhpo.tasks.families import draw_instances
from rlhpo.trainees import build_trainee, score_of

FAMILY_SUITE = """
name = "fam"
seed = SEED
test = ["held"]

[defaults]
metric = "accuracy"
intervals = 4
default = { lr = 1e-3, batch_size = 32, dropout = 0.1 }
space = { lr = [1e-5, 1e-1], batch_size = [16, 32, 64], dropout = [0.0, 0.5] }
start = { lr = [1e-5, 3e-2], batch_size = [32], dropout = [0.0, 0.3] }

[families.mlp]
instances = 3
model = ["mlp", "resmlp"]
datasets = { make_classification = { n_samples = [200, 400], n_classes = [2, 4] }, wine = {} }
width = [16, 64]
depth = [1, 3]
norm = ["pre", "post"]
budget_samples = [400, 800]
intervals = [2, 6]
optimizer = ["adam", "adamw", "sgd"]
weight_decay = { log = [1e-5, 1e-2] }
start = { lr = { choice = [[1e-5, 3e-2], [1e-4, 1e-2]] } }

[families.enc]
instances = 2
model = "encoder"
datasets = { parity = { n_samples = [200, 300], length = [4, 8] } }
width = [8, 24]
depth = 1
heads = { choice = [2, 4] }
budget_samples = 300

[tasks.held]
dataset = "digits"
model = "mlp"
budget_samples = 400
"""


def _suite(write_suite, seed=0, text=FAMILY_SUITE, name="suite.toml"):
    return load_suite(write_suite(text.replace("SEED", str(seed)), name=name))


def test_instances_are_drawn_deterministically_under_the_seed(write_suite):
    a = _suite(write_suite, 0, name="a.toml")
    b = _suite(write_suite, 0, name="b.toml")
    c = _suite(write_suite, 7, name="c.toml")
    assert a.train == b.train and len(a.train) == 5
    assert [a.tasks[n] for n in a.train] == [replace(b.tasks[n], source=a.source) for n in b.train]
    summary = lambda s: [s.tasks[n].summary() for n in s.train]  # noqa: E731
    assert summary(a) != summary(c)
    t = a.tasks[a.train[0]]
    assert t.family == "mlp" and t.optimizer in ("adam", "adamw", "sgd")
    assert 1e-5 <= t.weight_decay <= 1e-2 and 2 <= t.intervals <= 6
    assert t.start.lr in ((1e-5, 3e-2), (1e-4, 1e-2))
    enc = [a.tasks[n] for n in a.train if a.tasks[n].family == "enc"]
    assert all(e.model_args["hidden"] % e.model_args["heads"] == 0 for e in enc)
    # A family's draws depend on the seed and its own name only.
    fam = a.families[1]
    assert draw_instances(fam, 0) == draw_instances(fam, 0)


def test_folds_leave_one_family_out(write_suite):
    s = _suite(write_suite)
    folds = {f.family: f for f in s.folds()}
    assert set(folds) == {"mlp", "enc"}
    assert all(s.tasks[n].family == "enc" for n in folds["enc"].val)
    assert set(folds["enc"].train) == set(s.train) - set(folds["enc"].val)
    assert not set(folds["mlp"].val) & set(s.test)


@pytest.mark.parametrize(
    "old,new,needle",
    [
        (
            "width = [16, 64]",
            "width = [64, 16]",
            "'families.mlp.width': range is empty or inverted",
        ),
        ("width = [16, 64]", "width = []", "'families.mlp.width': range is empty: []"),
        (
            '"adamw", "sgd"]',
            '"adamw", "lion"]',
            "'families.mlp.optimizer' is unknown: 'lion'",
        ),
        ("width = [16, 64]", "width = [16, 5000]", "'families.mlp.width' must be <= 1024"),
        ("depth = [1, 3]", "depth = [1, 40]", "'families.mlp.depth' must be <= 12"),
        (
            "n_samples = [200, 400]",
            "n_samples = [200, 1000000000000]",
            "key 'n_samples' must be <= 20000 (the cap), got 1000000000000",
        ),
        (
            "length = [4, 8]",
            "length = [4, 100000]",
            "key 'length' must be <= 128 (the cap), got 100000",
        ),
        (
            "n_classes = [2, 4]",
            "n_classes = { choice = [2, 90, 3] }",
            "key 'n_classes' must be <= 50 (the cap), got 90",
        ),
        ("instances = 3", "instances = 0", "'families.mlp.instances' must be in [1, 64], got 0"),
        ("norm = [", "colour = 1\nnorm = [", "unknown key 'families.mlp.colour'"),
        (
            "weight_decay = { log = [1e-5, 1e-2] }",
            "weight_decay = { log = [0.0, 1e-2] }",
            "a log range needs low > 0",
        ),
        (
            'dataset = "digits"\nmodel = "mlp"',
            'dataset = "wine"\nmodel = "mlp"',
            "test task 'held' (model 'mlp' on dataset 'wine') overlaps the train split: "
            "family 'mlp'",
        ),
        (
            "datasets = { parity",
            "datasets = { lm_copy",
            "family 'enc' draws a task that is refused: key 'tasks.enc-00-lm_copy.model' = "
            "'encoder' does not fit dataset 'lm_copy'",
        ),
        ("budget_samples = 300\n", "", "missing key 'tasks.enc-00-parity.budget_samples'"),
    ],
)
def test_bad_families_are_refused_naming_key_and_value(write_suite, old, new, needle):
    assert old in FAMILY_SUITE
    with pytest.raises(SpecError) as e:
        _suite(write_suite, text=FAMILY_SUITE.replace(old, new, 1))
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "text,needle",
    [
        (
            'dataset = "digits"',
            "",
        ),
        (
            'dataset = "make_classification"\ndataset_args = { n_samples = 1000000000000 }',
            "key 'n_samples' must be <= 20000 (the cap), got 1000000000000",
        ),
        (
            'dataset = "mnist1d"\ndataset_args = { num_samples = 10000000 }',
            "key 'num_samples' must be <= 20000 (the cap)",
        ),
        (
            'dataset = "digits"\nmodel_args = { hidden = [30000000, 64] }',
            "key 'hidden' must be <= 1024 (the cap)",
        ),
        (
            'dataset = "digits"\nweight_decay = 3.0',
            "'tasks.a.weight_decay' must be in [0, 1], got 3.0",
        ),
        ('dataset = "digits"\noptimizer = "lion"', "'tasks.a.optimizer' is unknown: 'lion'"),
    ],
)
def test_task_sizes_are_capped(write_suite, text, needle):
    from tests.conftest import BASE_TASK

    path = write_suite(BASE_TASK.replace('dataset = "digits"', text, 1))
    if not needle:
        load_suite(path)
        return
    with pytest.raises(SpecError) as e:
        load_suite(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def _tiny(spec):
    """The same task at a few hundred samples and one short interval."""
    args = dict(spec.dataset_args)
    for k in ("n_samples", "num_samples"):
        if k in args or spec.dataset in ("shapes", "parity", "counting", "lm_sort"):
            args[k if spec.dataset != "mnist1d" else "num_samples"] = 300
    if spec.dataset == "mnist1d":
        args = {"num_samples": 300}
    return replace(spec, dataset_args=args, budget_samples=64, intervals=1)


def _default_v2_specs():
    s = load_suite("default")
    firsts = {}
    for n in s.train:
        firsts.setdefault(s.tasks[n].family, s.tasks[n])
    return list(firsts.values()) + s.split("test")


@pytest.mark.parametrize("spec", _default_v2_specs(), ids=lambda t: t.name)
def test_every_family_and_test_task_builds_and_trains_one_interval(spec):
    from rlhpo.baselines.single import run_single

    out = run_single(_tiny(spec), spec.default, seed=0)
    assert out.samples == 64 and out.intervals == 1
    assert out.test_score is not None


def test_default_suite_v2_shape():
    r = CliRunner().invoke(app, ["tasks", "--suite", "default", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert len(doc["families"]) >= 7
    test = [t for t in doc["tasks"] if t["split"] == "test"]
    assert len(test) >= 12
    attention = {t["model"] for t in test} & {"transformer", "encoder", "decoder"}
    assert sum(t["model"] in ("transformer", "encoder", "decoder") for t in test) >= 3
    assert "decoder" in attention
    assert sum(t["model"] in ("gru", "lstm") for t in test) >= 2
    assert len({(t["model"], t["dataset"]) for t in test}) == len(test)
    assert len(doc["folds"]) == len(doc["families"])
    train = [t for t in doc["tasks"] if t["split"] == "train"]
    assert len({t["intervals"] for t in train}) > 3
    assert {t["optimizer"] for t in train} == {"adam", "adamw", "sgd"}
    r = CliRunner().invoke(app, ["tasks", "--suite", "default", "--folds"])
    assert r.exit_code == 0 and "fold decoder:" in r.output


def test_previous_default_suite_is_kept_as_default_v1():
    s = load_suite("default-v1")
    assert s.name == "default-v1"
    assert s.test == ("mnist1d-cnn", "breast_cancer-mlp", "seq-transformer", "mnist1d-gru")


def test_next_token_accuracy_skips_prompt_positions():
    # (batch 1, vocab 3, length 3): per-position predictions 2, 0, 1; position 0 is a prompt.
    logits = torch.tensor([[[0.0, 9.0, 0.0], [0.0, 0.0, 9.0], [9.0, 0.0, 0.0]]])
    y = torch.tensor([[-100, 0, 0]])
    assert score_of("accuracy", logits, y) == 0.5
    assert score_of("accuracy", torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1])) == 0.5


def test_decoder_is_causal():
    spec = _tiny(load_suite("default").task("decoder-sort"))
    tr = build_trainee(spec, seed=0)
    tr.model.eval()
    x = tr.data.x_val[:2].clone()
    out = tr.model(x)
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % tr.data.vocab
    out2 = tr.model(x2)
    # Changing the last token changes no earlier position's prediction.
    assert torch.allclose(out[:, :, :-1], out2[:, :, :-1], atol=1e-6)
    assert not torch.allclose(out[:, :, -1], out2[:, :, -1])


def test_weight_decay_reaches_the_optimizer(write_suite):
    from tests.conftest import BASE_TASK

    path = write_suite(BASE_TASK.replace('model = "mlp"', 'model = "mlp"\nweight_decay = 0.02'))
    spec = load_suite(path).task("a")
    tr = build_trainee(spec, seed=0)
    assert tr.optimizer.param_groups[0]["weight_decay"] == 0.02
    sgd = build_trainee(replace(spec, optimizer="sgd"), seed=0)
    assert sgd.optimizer.param_groups[0]["momentum"] == 0.9


def test_env_runs_drawn_instances_of_the_default_suite():
    from rlhpo.env import HPOEnv

    s = load_suite("default")
    names = [n for n in s.train if s.tasks[n].family in ("decoder", "resmlp")][:2]
    env = HPOEnv(s, split="train", tasks=names, budget_scale=0.01)
    for name in names:
        obs, info = env.reset(seed=0, options={"task": name})
        assert env.observation_space.contains(obs)
        steps, done = 0, False
        while not done:
            obs, reward, term, trunc, info = env.step(env.action_space.sample())
            steps += 1
            done = term or trunc
        # Random actions may diverge a run (the episode then ends early).
        budget = s.tasks[name].scaled(0.01).budget_samples
        assert steps > 1 and (info["samples"] == budget or info["diverged"])
