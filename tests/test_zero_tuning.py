"""Zero-tuning baselines: Schedule-Free AdamW, Prodigy, D-Adaptation Adam."""

import csv

import pytest
import torch

from rlhpo.baselines.zero_tuning import ZERO_TUNING, run_zero_tuning, trainee_factory
from rlhpo.compare.methods import MethodError, parse_method, parse_methods
from rlhpo.compare.runner import CompareConfig, run_comparison
from rlhpo.tasks import load_suite


def test_methods_parse_and_refuse_arguments():
    ms = parse_methods("schedulefree,prodigy,dadapt?name=dadapt-adam")
    assert [(m.kind, m.optimizer, m.label) for m in ms] == [
        ("zero-tuning", "schedulefree", "schedulefree"),
        ("zero-tuning", "prodigy", "prodigy"),
        ("zero-tuning", "dadapt", "dadapt-adam"),
    ]
    assert all(m.start_independent for m in ms)
    with pytest.raises(MethodError, match="'prodigy' takes no ':' argument, got '3'"):
        parse_method("prodigy:3")
    with pytest.raises(MethodError, match="unknown option 'peak'"):
        parse_method("schedulefree?peak=0.1")


def test_zero_tuning_cells_run_in_compare(tmp_path):
    cfg = CompareConfig(
        out=tmp_path / "cmp",
        methods=parse_methods("static,schedulefree,prodigy,dadapt"),
        suite="tiny",
        split="test",
        tasks=["bc-mlp"],
        seeds=[0],
        starts=["default"],
        workers=1,
        use_wandb=False,
        bootstrap_reps=100,
        plots=False,
    )
    res = run_comparison(cfg, show_progress=False)
    assert res.failed == []
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "results.csv")))
    zt = [r for r in rows if r["kind"] == "zero-tuning"]
    assert sorted(r["method"] for r in zt) == sorted(ZERO_TUNING)
    budget = load_suite("tiny").task("bc-mlp").budget_samples
    for r in zt:
        assert r["start"] == "any" and int(r["samples"]) == budget
        assert int(r["final_batch_size"]) == 64  # the task's default batch size
        assert float(r["norm_test_score"]) > 0.0


@pytest.mark.parametrize("method", ["prodigy", "dadapt"])
def test_lr_free_optimizers_adapt_their_step_and_ignore_the_lr_knob(method):
    spec = load_suite("tiny").task("bc-mlp")
    out = run_zero_tuning(spec, method, seed=0)
    lrs = [r["lr"] for r in out.trace]
    assert lrs[-1] > 100 * max(lrs[0], 1e-9)  # d grew from its tiny d0
    tr = trainee_factory(method)(spec, dict(spec.default), 0, None)
    before = tr.optimizer.param_groups[0]["lr"]
    tr.set_hp(lr=1e-5, dropout=0.2)
    assert tr.optimizer.param_groups[0]["lr"] == before == 1.0
    assert tr.hp["dropout"] == pytest.approx(0.2)


def test_schedulefree_evaluates_in_eval_mode_and_trains_in_train_mode():
    spec = load_suite("tiny").task("bc-mlp")
    tr = trainee_factory("schedulefree")(spec, dict(spec.default), 0, None)
    group = tr.optimizer.param_groups[0]
    seen = []
    tr.model.register_forward_hook(lambda m, i, o: seen.append((m.training, group["train_mode"])))
    tr.train(128)
    assert seen and all(mode for _, mode in seen)
    seen.clear()
    ev = tr.evaluate("val")
    assert seen == [(False, False)]  # averaged weights swapped in for evaluation
    assert group["train_mode"] is True  # and back for training
    # Evaluating must not move the weights training continues from.
    w = [p.detach().clone() for p in tr.model.parameters()]
    assert tr.evaluate("val") == ev
    assert all(torch.equal(a, b) for a, b in zip(w, tr.model.parameters(), strict=True))
