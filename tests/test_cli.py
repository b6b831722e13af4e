"""Every bad input to the command line is one line naming the rule and the value,
with exit status 2 and no traceback; nothing already written is lost."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhpo.cli import app
from rlhpo.policy import PolicyNet, save_policy

TINY = "tiny"
QUICK = ["--suite", TINY, "--seeds", "1", "--no-wandb", "--workers", "1"]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A file where a folder belongs, and a policy whose weights were cut short."""
    root = tmp_path_factory.mktemp("bad")
    (root / "FILE").write_text("keep me\n")
    pol = save_policy(root / "trunc", PolicyNet(), suite="tiny", agent="test")
    w = pol / "policy.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    return root


CASES = {
    "demo --seeds 0": (["demo", "--seeds", "0"], "--seeds must be >= 1, got 0"),
    "demo --trials 0": (["demo", "--trials", "0"], "--trials must be >= 1, got 0"),
    "demo --out FILE": (["demo", "--out", "{root}/FILE"], "FILE is a file"),
    "demo --task nosuch": (
        ["demo", "--task", "nosuch"],
        "--task must be a held-out task of suite 'default-v1' (mnist1d-cnn, breast_cancer-mlp, "
        "seq-transformer, mnist1d-gru), got 'nosuch'",
    ),
    "compare --out FILE": (
        ["compare", "--out", "{root}/FILE", "--methods", "static", *QUICK],
        "FILE is a file",
    ),
    "compare --out FILE/sub": (
        ["compare", "--out", "{root}/FILE/sub", "--methods", "static", *QUICK],
        "which is a file",
    ),
    "compare --bootstrap-reps 0": (
        ["compare", "--out", "{root}/c", "--methods", "static", "--bootstrap-reps", "0", *QUICK],
        "--bootstrap-reps must be >= 100, got 0",
    ),
    "compare policy:truncated": (
        ["compare", "--out", "{root}/c", "--methods", "policy:{root}/trunc", *QUICK],
        "not a readable safetensors file",
    ),
    "train --out FILE": (["train", "--out", "{root}/FILE", "--no-wandb"], "FILE is a file"),
    "train --timesteps 0": (
        ["train", "--out", "{root}/t", "--timesteps", "0"],
        "--timesteps must be >= 1, got 0",
    ),
    "train --executor bogus": (
        ["train", "--out", "{root}/t", "--executor", "dask"],
        "--executor must be local or ray, got 'dask'",
    ),
    "train --address without ray": (
        ["train", "--out", "{root}/t", "--address", "127.0.0.1:6379"],
        "--address applies to --executor ray only, got --address 127.0.0.1:6379 with "
        "--executor local",
    ),
    "train --executor ray --agent reinforce": (
        ["train", "--out", "{root}/t", "--executor", "ray", "--agent", "reinforce"],
        "reinforce and vine run their envs in local processes: use --agent ppo with "
        "--executor ray, or --executor local, got --agent reinforce",
    ),
    "train --executor ray vec_env=subproc": (
        ["train", "--out", "{root}/t", "--executor", "ray", "--set", "vec_env=subproc"],
        "--executor ray steps env shards in Ray actors (each in its actor's process): "
        "vec_env must be auto, batched or dummy, got vec_env='subproc' (set --set "
        "vec_env=dummy, or use --executor local)",
    ),
    "train --executor ray unreachable --address": (
        ["train", "--out", "{root}/t", "--executor", "ray", "--address", "127.0.0.1:1"],
        "--address 127.0.0.1:1: cannot connect to the Ray cluster (nothing answers at 127.0.0.1:1",
    ),
    "train --executor ray --address not-an-address": (
        ["train", "--out", "{root}/t", "--executor", "ray", "--address", "head"],
        "not HOST:PORT, ray://HOST:PORT or auto: 'head'",
    ),
    "episode --start bogus": (
        ["episode", "--suite", TINY, "--start", "bogus"],
        "--start must be default or random, got 'bogus'",
    ),
    "apply truncated policy": (
        ["apply", "--policy", "{root}/trunc", "--task", "bc-mlp", "--suite", TINY, "--no-wandb"],
        "not a readable safetensors file",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_2(bad, name):
    args, message = CASES[name]
    args = [a.format(root=bad) for a in args]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, (r.output, r.exception)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert (bad / "FILE").read_text() == "keep me\n"
    assert not (bad / "c").exists() and not (bad / "t").exists()


def test_a_results_row_with_a_bad_seed_is_one_line(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--out", str(out), "--methods", "static", "--tasks", "bc-mlp"]
    args += [*QUICK, "--bootstrap-reps", "100"]
    assert CliRunner().invoke(app, args).exit_code == 0
    results = out / "results.csv"
    lines = results.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace(",bc-mlp,0,", ",bc-mlp,zero,")
    results.write_text("".join(lines))
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "seed 'zero', not an integer" in r.output
    assert results.read_text() == "".join(lines)


def test_boolean_options_show_as_flags():
    for cmd in (["train"], ["compare"], ["apply"], ["tasks"]):
        r = CliRunner().invoke(app, [*cmd, "--help"], terminal_width=200)
        assert r.exit_code == 0
        for line in r.output.splitlines():
            if any(f in line for f in ("--json", "--no-wandb", "--resume", "--stochastic")):
                assert "<bool>" not in line, line


def test_train_says_when_it_rounds_timesteps_up(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--agent", "reinforce", "--suite", TINY]
    r = CliRunner().invoke(app, [*args, "--timesteps", "3", "--no-wandb"])
    assert r.exit_code == 0, r.output
    assert "for --timesteps 3: reinforce trains in whole episodes" in r.output
    assert Path(out / "policy" / "manifest.json").is_file()


def test_an_address_without_a_ray_cluster_is_refused_by_the_probe():
    """ray.init retries an address for minutes; the probe (a TCP connect, then one GCS
    request, each bounded by RAY_PROBE_TIMEOUT_S) refuses it first. 10.255.255.1 is
    private and unrouted: depending on the network the connect times out, is refused,
    or something that is not Ray answers; each is a ConnectionError naming it."""
    from rlhpo.runtime import RAY_PROBE_TIMEOUT_S, probe_ray_address

    assert 2 * RAY_PROBE_TIMEOUT_S <= 30
    with pytest.raises(ConnectionError, match="10.255.255.1:6379"):
        probe_ray_address("10.255.255.1:6379", timeout_s=0.5)
    with pytest.raises(ConnectionError, match="nothing answers at 127.0.0.1:1"):
        probe_ray_address("ray://127.0.0.1:1")
