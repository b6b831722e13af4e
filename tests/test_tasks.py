import json

import pytest
from typer.testing import CliRunner

from rlhpo.cli import app
from rlhpo.tasks import SpecError, load_suite
from tests.conftest import BASE_TASK


def test_default_suite_has_the_required_variety(suite):
    assert len(suite.tasks) >= 10
    specs = suite.split("all")
    datasets = {t.dataset for t in specs}
    models = {t.model for t in specs}
    assert {"mnist1d", "digits", "wine", "breast_cancer", "make_classification"} <= datasets
    assert {"make_regression", "friedman1", "sequences"} & datasets
    assert {"mlp", "cnn1d", "gru", "transformer"} <= models
    assert any(t.metric == "r2" for t in specs)
    train_combos = {(t.dataset, t.model) for t in suite.split("train")}
    unseen = [t for t in suite.split("test") if (t.dataset, t.model) not in train_combos]
    assert len(unseen) >= 3
    assert not set(suite.train) & set(suite.test)


def test_start_distribution_spans_good_and_bad(suite):
    for t in suite.split("all"):
        assert t.start.lr[0] <= 1e-4 and t.start.lr[1] >= 1e-2
        assert t.default == {"lr": 1e-3, "batch_size": 64, "dropout": 0.1}


@pytest.mark.parametrize(
    "old,new,needle",
    [
        ('model = "mlp"', 'model = "mlp"\ncolour = "red"', "unknown key 'tasks.a.colour'"),
        (
            "budget_samples = 2000",
            'budget_samples = "lots"',
            "'tasks.a.budget_samples' must be int, got 'lots'",
        ),
        (
            "lr = [1e-5, 1e-1]",
            "lr = [1e-1, 1e-5]",
            "'tasks.a.space.lr' is empty or inverted: [0.1, 1e-05]",
        ),
        (
            "dropout = [0.0, 0.5] }",
            "dropout = [0.3, 0.3] }",
            "'tasks.a.space.dropout' is empty or inverted",
        ),
        ('dataset = "digits"', 'dataset = "imagenet"', "'tasks.a.dataset' is unknown: 'imagenet'"),
        ('model = "mlp"', 'model = "resnet"', "'tasks.a.model' is unknown: 'resnet'"),
        ('metric = "accuracy"', 'metric = "f1"', "'tasks.a.metric' is unknown: 'f1'"),
        ("batch_size = [16, 32, 64, 128]", "batch_size = [64, 16]", "strictly increasing"),
        (
            "intervals = 4",
            "intervals = 0",
            "'tasks.a.intervals' must be in [1, budget_samples], got 0",
        ),
        ('train = ["a"]', 'train = ["a", "zzz"]', "'train' names unknown task 'zzz'"),
        (
            "default = { lr = 1e-3,",
            "default = { lr = 5.0,",
            "'tasks.a.default.lr' = 5.0 lies outside",
        ),
        (
            'model = "mlp"',
            'model = "mlp"\nmodel_args = { hidden = [0] }',
            "key 'hidden' must be a non-empty list",
        ),
        (
            'model = "mlp"',
            'model = "mlp"\ndataset_args = { n_samples = 10 }',
            "unknown key 'n_samples' for dataset 'digits'",
        ),
    ],
)
def test_bad_specs_name_file_key_and_value(write_suite, old, new, needle):
    assert old in BASE_TASK
    path = write_suite(BASE_TASK.replace(old, new, 1))
    with pytest.raises(SpecError) as e:
        load_suite(path)
    msg = str(e.value)
    assert str(path) in msg
    assert needle in msg


def test_malformed_toml_and_unknown_suite(write_suite):
    path = write_suite("name = [unclosed")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_suite(path)
    with pytest.raises(SpecError, match="unknown suite 'nope'"):
        load_suite("nope")


def test_valid_base_suite_loads(write_suite):
    s = load_suite(write_suite())
    assert s.train == ("a",) and s.task("a").interval_samples == 500


def test_cli_lists_tasks_as_json_and_table():
    r = CliRunner().invoke(app, ["tasks", "--split", "test", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["tasks"]
    assert rows and all(row["split"] == "test" for row in rows)
    assert {"dataset", "model", "budget_samples", "metric"} <= set(rows[0])
    r = CliRunner().invoke(app, ["tasks"])
    assert r.exit_code == 0 and "mnist1d" in r.output
    r = CliRunner().invoke(app, ["tasks", "--suite", "nope"])
    assert r.exit_code == 2 and "unknown suite" in r.output
