"""The LOFO selection rule of issue #22 (experiments/transfer/vine_lofo.py): one setting,
and the session-9 amendment over four settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lofo():
    path = ROOT / "experiments" / "transfer" / "vine_lofo.py"
    spec = importlib.util.spec_from_file_location("vine_lofo_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _s(mean, worst, kind="vine"):
    return {"mean": mean, "worst": worst, "kind": kind}


def _settings(lofo, table):
    """``table``: name -> (kind, [(mean, worst) per RULE_SETTINGS])."""
    return {
        s: {n: _s(*cells[i], kind) for n, (kind, cells) in table.items()}
        for i, s in enumerate(lofo.RULE_SETTINGS)
    }


def test_one_setting_prior_wins_a_tie(lofo):
    summary = {
        "prior": _s(0.739, 0.0, "prior"),
        "rescue": _s(0.729, -0.109, "rule"),
        "small": _s(0.743, 0.0),  # within 0.005: the prior wins the tie
        "harmful": _s(0.80, -0.02),  # best mean, but harms a fold: does not qualify
    }
    sel = lofo.select(summary)
    assert "harmful" not in sel["qualifying"]
    assert sel["tied"] == ["prior", "small"]
    assert sel["pick"] == "prior"


def test_amended_rule_judges_every_setting(lofo):
    prior = [(0.739, 0.0), (0.801, 0.0), (0.681, 0.0), (0.804, 0.0)]
    table = {
        "prior": ("prior", prior),
        # gains only off-peak, never harms a fold by more than 0.01: wins
        "offpeak": ("vine", [(0.740, -0.009), (0.803, 0.0), (0.754, -0.003), (0.803, -0.005)]),
        # gains more off-peak, but harms a fold at x4: does not qualify
        "harms-x4": ("vine", [(0.739, 0.0), (0.804, -0.008), (0.779, -0.004), (0.800, -0.020)]),
    }
    combined = lofo.across_settings(_settings(lofo, table))
    assert combined["offpeak"]["worst"] == pytest.approx(-0.009)
    assert combined["harms-x4"]["worst"] == pytest.approx(-0.020)
    assert combined["offpeak"]["mean"] == pytest.approx((0.740 + 0.803 + 0.754 + 0.803) / 4)
    sel = lofo.select(combined)
    assert sel["qualifying"] == ["prior", "offpeak"]
    assert sel["pick"] == "offpeak"
    # the same rows judged on the committed setting alone: a tie, so the prior
    assert lofo.select(_settings(lofo, table)[""])["pick"] == "prior"


def test_amended_rule_leaves_out_a_variant_missing_a_setting(lofo):
    prior = [(0.7, 0.0)] * 4
    per = _settings(lofo, {"prior": ("prior", prior), "v": ("vine", [(0.9, 0.0)] * 4)})
    del per["rollback-x4"]["v"]
    assert list(lofo.across_settings(per)) == ["prior"]


def test_amended_rule_needs_every_setting(lofo):
    per = _settings(lofo, {"prior": ("prior", [(0.7, 0.0)] * 4)})
    del per["rollback-x0.25"]
    with pytest.raises(ValueError, match="missing \\['rollback-x0.25'\\]"):
        lofo.across_settings(per)
