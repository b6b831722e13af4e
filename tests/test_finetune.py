"""Fine-tuning tasks (issue 23): the `latent` source/target data, pretrained bodies
cached on disk, the `finetune` suite, and the default suite left as it was."""

import hashlib
import json
import logging
from dataclasses import replace

import pytest
import torch

from rlhpo.tasks import SpecError, load_suite, parse_task
from rlhpo.tasks.datasets import load_data
from rlhpo.tasks.spec import resolve_suite_path
from rlhpo.trainees import build_trainee, pretrained
from rlhpo.trainees.pretrained import (
    body_config,
    body_state,
    cache_dir,
    cache_key,
    cached_body,
    head_name,
    load_body,
    pretrain_body,
)

# The default suite's tasks as they were before the fine-tuning family existed: the
# lead's experiments are keyed on these names and specs.
DEFAULT_SUITE_SHA256 = "03190c0b8eebc005933a987105e6712a8ebde33f3587c6dcf69ddf12c7abdf5b"
DEFAULT_TEST = (
    "mlp-mnist1d mlp-shapes resmlp-friedman resmlp-shapes cnn1d-digits cnn2d-shapes "
    "gru-counting gru-mnist1d lstm-parity encoder-counting bert-counting decoder-sort"
).split()


def _raw(**over):
    raw = {
        "dataset": "latent",
        "dataset_args": {"n_samples": 200, "relatedness": 0.8},
        "model": "mlp",
        "model_args": {"hidden": [16]},
        "metric": "accuracy",
        "budget_samples": 200,
        "intervals": 2,
        "default": {"lr": 1e-3, "batch_size": 32, "dropout": 0.1},
        "space": {"lr": [1e-5, 1e-1], "batch_size": [16, 32, 64], "dropout": [0.0, 0.5]},
        "start": {"lr": [1e-5, 1e-3], "batch_size": [32], "dropout": [0.0, 0.1]},
        "pretrain": {"samples": 300, "budget_samples": 600, "seed": 3},
    }
    raw.update(over)
    return raw


def _task(**over):
    return parse_task("ft", _raw(**over))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "_BODIES", {})
    return tmp_path / "cache"


def test_default_suite_instances_and_test_tasks_are_unchanged():
    s = load_suite("default")
    blob = json.dumps({n: s.tasks[n].summary() for n in s.train + s.test}, sort_keys=True)
    assert list(s.test) == DEFAULT_TEST
    assert hashlib.sha256(blob.encode()).hexdigest() == DEFAULT_SUITE_SHA256


def test_finetune_suite_draws_fine_tuning_instances():
    s = load_suite("finetune")
    assert len(s.train) == 4 and len(s.test) == 3
    for n in s.train + s.test:
        t = s.tasks[n]
        assert t.dataset == "latent" and t.pretrain["seed"] == s.seed
        assert 1e-5 <= t.default["lr"] <= 1e-3
    assert {s.tasks[n].family for n in s.train} == {"finetune"}
    lrs = {s.tasks[n].default["lr"] for n in s.train}
    assert len(lrs) == len(s.train)  # the user's lr is drawn per instance


def test_source_and_target_share_the_map_not_the_readout():
    # margin 0 keeps every sample, so both draw the same latent factors.
    a = {"n_samples": 300, "relatedness": 1.0, "margin": 0.0}
    src = load_data("latent", a, data_seed=1)
    tgt = load_data("latent", {**a, "relatedness": 0.3}, data_seed=1)
    other = load_data("latent", {**a, "generator": 5}, data_seed=1)
    assert torch.equal(src.x_train, tgt.x_train)
    assert not torch.equal(src.y_train, tgt.y_train)
    assert not torch.allclose(src.x_train, other.x_train)


def test_latent_samples_keep_clear_of_class_boundaries():
    d = load_data("latent", {"n_samples": 400, "margin": 1.0}, data_seed=2)
    assert d.n_train + len(d.y_val) + len(d.y_test) == 400
    with pytest.raises(SpecError, match="key 'margin' must be <= 3.0"):
        parse_task("ft", {**_raw(), "dataset_args": {"margin": 5.0}})


def test_body_is_pretrained_once_cached_as_safetensors_and_reused(_cache, monkeypatch):
    spec = _task()
    body = cached_body(spec)
    files = list((_cache / "bodies").glob("*.safetensors"))
    assert [f.stem for f in files] == [cache_key(body_config(spec))]
    assert not list((_cache / "bodies").glob("*.tmp"))
    monkeypatch.setattr(pretrained, "_BODIES", {})
    monkeypatch.setattr(pretrained, "pretrain_body", lambda s: pytest.fail("pretrained again"))
    again = cached_body(spec)
    assert all(torch.equal(body[k], again[k]) for k in body)


def test_pretraining_is_deterministic_and_depends_on_the_seed():
    spec = _task()
    a, b = pretrain_body(spec), pretrain_body(spec)
    c = pretrain_body(replace(spec, pretrain={**spec.pretrain, "seed": 4}))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert cache_key(body_config(spec)) != cache_key(
        body_config(replace(spec, pretrain={**spec.pretrain, "seed": 4}))
    )


def test_runs_start_from_the_body_with_a_new_head():
    spec = _task()
    body = cached_body(spec)
    r1, r2 = build_trainee(spec, seed=1), build_trainee(spec, seed=2)
    head = head_name(r1.model) + "."
    s1, s2 = r1.model.state_dict(), r2.model.state_dict()
    for k, v in body.items():
        assert torch.equal(s1[k], v) and torch.equal(s2[k], v)
    heads = [k for k in s1 if k.startswith(head)]
    assert heads and not all(torch.equal(s1[k], s2[k]) for k in heads)
    r1.train(64)
    assert r1.samples_seen == 64


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_missing_or_corrupt_body_is_rebuilt_with_a_one_line_warning(_cache, caplog, damage):
    spec = _task()
    body = cached_body(spec)
    path = _cache / "bodies" / f"{cache_key(body_config(spec))}.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    else:
        path.unlink()
    pretrained._BODIES.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhpo.pretrained"):
        again = cached_body(spec)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "\n" not in msgs[0] and path.name in msgs[0]
    assert ("corrupt" in msgs[0]) == (damage != "delete")
    assert all(torch.equal(body[k], again[k]) for k in body)
    assert path.is_file()


def test_a_body_whose_config_does_not_match_its_key_is_rebuilt(_cache, caplog):
    spec = _task()
    cached_body(spec)
    other = _task(pretrain={"samples": 300, "budget_samples": 600, "seed": 5})
    cached_body(other)
    key, other_key = (cache_key(body_config(s)) for s in (spec, other))
    d = _cache / "bodies"
    (d / f"{key}.safetensors").write_bytes((d / f"{other_key}.safetensors").read_bytes())
    pretrained._BODIES.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhpo.pretrained"):
        cached_body(spec)
    assert any("does not match" in r.getMessage() for r in caplog.records)


def test_a_body_of_other_widths_is_a_one_line_error_naming_both_shapes():
    spec = _task()
    body = cached_body(spec)
    wide = build_trainee(_task(model_args={"hidden": [24]}), seed=0).model
    with pytest.raises(SpecError) as e:
        load_body(wide, body, "ft")
    msg = str(e.value)
    assert "\n" not in msg and "(16, 32)" in msg and "(24, 32)" in msg
    deeper = build_trainee(_task(model_args={"hidden": [16, 16]}), seed=0).model
    with pytest.raises(SpecError, match="does not fit the model: keys missing"):
        load_body(deeper, body, "ft")


@pytest.mark.parametrize(
    ("pretrain", "needle"),
    [
        (
            {"budget_samples": 10**7},
            "key 'budget_samples' must be in [1, 400000] (the caps), got 10000000",
        ),
        ({"samples": 10**6}, "key 'samples' must be in [100, 20000] (the caps), got 1000000"),
        ({"lr": 0}, "key 'lr' must be in [1e-06, 1.0] (the caps), got 0.0"),
        ({"epochs": 3}, "unknown key 'epochs'"),
        ({"seed": "x"}, "key 'seed' must be int, got 'x'"),
    ],
)
def test_pretraining_beyond_the_caps_is_refused_when_read(pretrain, needle):
    with pytest.raises(SpecError) as e:
        _task(pretrain=pretrain)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_pretraining_beyond_the_caps_is_refused_before_it_starts(monkeypatch):
    spec = replace(_task(), pretrain={"samples": 300, "budget_samples": 10**7, "seed": 0})
    monkeypatch.setattr(pretrained, "load_data", lambda *a, **k: pytest.fail("data built"))
    with pytest.raises(SpecError, match=r"budget_samples' must be in \[1, 400000\]"):
        cached_body(spec)


def test_pretraining_a_body_too_large_for_its_budget_is_refused_before_training(monkeypatch):
    from rlhpo.trainees.trainee import Trainee

    spec = _task(
        model_args={"hidden": [1024, 1024, 1024]},
        pretrain={"samples": 300, "budget_samples": 400000, "seed": 0},
    )
    monkeypatch.setattr(Trainee, "train", lambda *a, **k: pytest.fail("pretraining started"))
    with pytest.raises(SpecError) as e:
        cached_body(spec)
    msg = str(e.value)
    assert "exceeds the cap 1e+11 parameters x samples" in msg and "\n" not in msg
    assert not (pretrained.cache_dir() / "bodies").exists()


def test_pretraining_needs_a_source_task_and_a_body_model():
    with pytest.raises(SpecError, match="needs a dataset with a source task"):
        _task(dataset="wine", dataset_args={})
    with pytest.raises(SpecError, match="pretraining needs model"):
        _task(model="gru", model_args={})


def test_a_family_pretraining_beyond_the_caps_is_refused(tmp_path):
    text = resolve_suite_path("finetune").read_text()
    bad = text.replace(
        "pretrain = { samples = 10000, budget_samples = 200000 }\n\n[tasks.resmlp-finetune-near]",
        "pretrain = { samples = 10000, budget_samples = [1000, 900000] }\n\n"
        "[tasks.resmlp-finetune-near]",
    )
    assert bad != text
    p = tmp_path / "bad.toml"
    p.write_text(bad)
    with pytest.raises(SpecError, match=r"families.finetune.pretrain'.*900000"):
        load_suite(p)


def test_cache_dir_follows_rlhpo_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHPO_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("RLHPO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "rlhpo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_dir() == tmp_path / "h" / ".cache" / "rlhpo"


def test_body_state_leaves_out_the_head_only():
    model = build_trainee(_task(), seed=0).model
    state = body_state(model)
    assert head_name(model) == "net.3"  # Linear, ReLU, Dropout, Linear
    assert set(state) == {"net.0.weight", "net.0.bias"}


TINY_FT_SUITE = """
name = "tinyft"
seed = 4
test = ["held"]

[defaults]
metric = "accuracy"
intervals = 4
default = { lr = 1e-4, batch_size = 32, dropout = 0.1 }
space = { lr = [1e-5, 1e-1], batch_size = [16, 32, 64], dropout = [0.0, 0.5] }
start = { lr = [1e-5, 1e-3], batch_size = [32], dropout = [0.0, 0.1] }

[families.ft]
instances = 2
model = ["mlp", "cnn1d"]
datasets = { latent = { n_samples = [150, 250], relatedness = [0.5, 0.9] } }
width = [8, 16]
depth = [1, 2]
budget_samples = [200, 400]
default = { lr = { log = [1e-5, 1e-3] } }
pretrain = { samples = 300, budget_samples = [400, 800] }

[tasks.held]
dataset = "latent"
dataset_args = { n_samples = 150 }
model = "resmlp"
model_args = { width = 16, blocks = 1 }
budget_samples = 200
pretrain = { samples = 300, budget_samples = 600 }
"""


def test_a_fine_tuning_family_draws_bodies_seeded_by_the_suite(write_suite):
    s = load_suite(write_suite(TINY_FT_SUITE))
    for n in s.train + s.test:
        assert s.tasks[n].pretrain["seed"] == 4
    drawn = [s.tasks[n].pretrain["budget_samples"] for n in s.train]
    assert all(400 <= b <= 800 for b in drawn)
    again = load_suite(write_suite(TINY_FT_SUITE.replace("seed = 4", "seed = 5"), "s5.toml"))
    assert {again.tasks[n].pretrain["seed"] for n in again.train} == {5}


def test_env_and_compare_run_fine_tuning_tasks_from_the_users_lr(write_suite, tmp_path):
    import numpy as np

    from rlhpo.actions import ActionCodec
    from rlhpo.compare.methods import Cell, parse_method
    from rlhpo.env import HPOEnv
    from rlhpo.policy import load_policy

    suite = load_suite(write_suite(TINY_FT_SUITE))
    # the prior (always "keep"): the lr is then the base schedule's alone
    base = load_policy("v2-prior").base_schedule.with_peak("user", 30.0)
    env = HPOEnv(suite, split="test", base_schedule=base)
    env.reset(seed=0, options={"start": "default"})
    assert env.hp["lr"] == pytest.approx(3e-3)  # the task's lr 1e-4 x 30
    _, _, _, _, info = env.step(np.array(ActionCodec.NOOP))
    assert 0 < info["lr_in_force"] < 3e-3  # warming up towards it
    spec = suite.task("held")
    method = parse_method("policy:v2-prior?base_peak=user&peak_factor=30")
    cell = Cell(method, spec, 0, "default", str(tmp_path), "t", suite_name="tinyft")
    run = method.run(cell)
    assert max(r["lr"] for r in run.outcome.trace) <= 3e-3 + 1e-12
    tuned = parse_method("policy:v2-prior").run(cell)
    assert max(r["lr"] for r in tuned.outcome.trace) > 1e-2  # the from-scratch peak


@pytest.mark.slow
def test_readme_fine_tuning_example_runs(capsys):
    import runpy
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_controller.py"
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    for row in ("| static |", "| policy (tuned peak) |", "| policy (user peak x30) |"):
        assert row in out


FINETUNE_IN_DEFAULT = """

[families.finetune]
instances = 4
model = ["mlp", "cnn1d"]
datasets = { latent = { n_samples = [200, 500], relatedness = [0.5, 0.95], generator = [0, 999] } }
width = [64, 128]
depth = [1, 2]
budget_samples = [4000, 8000]
intervals = [10, 20]
optimizer = ["adam", "adamw"]
test_fraction = 0.45
default = { lr = { log = [1e-5, 1e-3] }, batch_size = 32 }
start = { lr = [1e-5, 1e-3] }
pretrain = { samples = 10000, budget_samples = 200000 }

[tasks.resmlp-finetune-near]
dataset = "latent"
dataset_args = { n_samples = 300, relatedness = 0.9, generator = 7 }
model = "resmlp"
model_args = { width = 64, blocks = 2, norm = "pre" }
default = { lr = 2e-5, batch_size = 32, dropout = 0.1 }
budget_samples = 6000
pretrain = { samples = 10000, budget_samples = 200000 }
"""


def test_adding_the_fine_tuning_family_to_default_changes_no_existing_task(write_suite):
    text = resolve_suite_path("default").read_text()
    text = text.replace('"decoder-sort",\n]', '"decoder-sort", "resmlp-finetune-near",\n]')
    assert "resmlp-finetune-near" in text
    s = load_suite(write_suite(text + FINETUNE_IN_DEFAULT, "default.toml"))
    old = load_suite("default")
    names = old.train + old.test
    blob = json.dumps({n: s.tasks[n].summary() for n in names}, sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest() == DEFAULT_SUITE_SHA256
    new = [n for n in s.train if n not in old.train]
    assert len(new) == 4 and all(s.tasks[n].pretrain for n in new)
    assert "finetune" in {f.family for f in s.folds()}  # its own LOFO fold


def test_batched_runs_start_from_the_body_too():
    from rlhpo.trainees.batched import BatchedTrainee

    spec = _task()
    body = cached_body(spec)
    group = BatchedTrainee(spec)
    runs = [group.add({"dropout": 0.1}, seed=s) for s in (1, 2)]
    for run in runs:
        state = run.to_module().state_dict()
        assert all(torch.equal(state[k], v) for k, v in body.items())
    group.train([(r, 64) for r in runs])


def test_a_failed_write_leaves_no_file_behind(_cache, monkeypatch):
    import safetensors.torch

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        cached_body(_task())
    assert list((_cache / "bodies").iterdir()) == []
