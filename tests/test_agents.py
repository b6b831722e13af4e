import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rlhpo.agents import load_settings
from rlhpo.agents.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    flatten_optimizer_state,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_optimizer_state,
)
from rlhpo.agents.ppo import PPOSettings, export_policy, train_ppo
from rlhpo.agents.reinforce import ReinforceSettings, train_reinforce
from rlhpo.cli import app
from rlhpo.policy import load_policy

TINY = {"tasks": ("wine-mlp", "digits-mlp"), "budget_scale": 0.02}
# The tasks above are in the first default suite, kept as default-v1.
V1 = "default-v1"
TINY_SET = ["--suite", V1, "--set", "budget_scale=0.02", "--set", 'tasks=["wine-mlp","digits-mlp"]']


def tiny_ppo(**kw) -> PPOSettings:
    base = dict(TINY, n_envs=2, vec_env="dummy", n_steps=20, batch_size=20, n_epochs=2)
    return PPOSettings(**{**base, **kw})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_exported_policy_acts_like_sb3(tmp_path):
    from stable_baselines3 import PPO

    from rlhpo.agents.envs import make_vec_env
    from rlhpo.agents.ppo import _build_model, normalize

    s = tiny_ppo()
    venv = normalize(
        make_vec_env(n_envs=2, seed=0, backend="dummy", timing=True, suite=V1, **TINY), s
    )
    model = _build_model(s, venv, seed=0)
    assert isinstance(model, PPO)
    model.learn(80)  # moves the weights and the VecNormalize statistics off their init
    assert not np.allclose(venv.obs_rms.mean, 0)
    obs = np.stack([venv.get_original_obs()] + [venv.unnormalize_obs(venv.reset())])
    obs = np.concatenate(
        [obs.reshape(-1, 16), np.random.default_rng(0).normal(0, 0.5, (200, 16))]
    ).astype(np.float32)
    net = export_policy(model, venv)
    want, _ = model.predict(venv.normalize_obs(obs), deterministic=True)
    np.testing.assert_array_equal(net.act(obs), want)
    # and through a policy file
    from rlhpo.policy import save_policy

    pol = load_policy(save_policy(tmp_path / "p", net, agent="ppo"))
    np.testing.assert_array_equal(pol.act(obs), want)


def test_ppo_trains_on_the_batched_env(tmp_path, monkeypatch):
    """The recipe's default vector env: the runs of batchable tasks train together."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    from rlhpo.agents.envs import make_vec_env
    from rlhpo.vec_env import BatchedVecEnv

    venv = make_vec_env(n_envs=4, seed=0, backend="batched", suite=V1, **TINY)
    assert isinstance(venv.unwrapped, BatchedVecEnv) and venv.num_envs == 4
    venv.close()
    out = tmp_path / "run"
    s = tiny_ppo(n_envs=4, vec_env="batched", n_steps=10)
    info = train_ppo(s, out, timesteps=80, seed=0, show_progress=False, suite=V1)
    assert info["timesteps"] >= 80 and info["episodes"] > 0
    assert load_policy(out / "policy").manifest["recipe"]["vec_env"] == "batched"
    with pytest.raises(ValueError, match="n_procs must be >= 1, got 0"):
        make_vec_env(n_envs=2, backend="batched", n_procs=0, suite=V1, **TINY)
    # "auto" (the recipe's default): batched where a task is batchable (3 envs per task), else one model
    # per env, in subprocesses only when there are no more envs than cores.
    from stable_baselines3.common.vec_env import DummyVecEnv

    auto = make_vec_env(n_envs=6, backend="auto", suite=V1, **TINY)
    assert isinstance(auto.unwrapped, BatchedVecEnv)
    auto.close()
    gru = make_vec_env(suite=V1, n_envs=3, backend="auto", tasks=["seq-gru"], budget_scale=0.02)
    assert isinstance(gru.unwrapped, BatchedVecEnv)  # GRU runs batch with torch.func
    gru.close()
    monkeypatch.setattr("rlhpo.vec_env.supports_batching", lambda t: t.model != "gru")
    gru = make_vec_env(suite=V1, n_envs=64, backend="auto", tasks=["seq-gru"], budget_scale=0.02)
    assert isinstance(gru.unwrapped, DummyVecEnv) and gru.num_envs == 64
    gru.close()


def test_ppo_run_logs_to_jsonl_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    info = train_ppo(tiny_ppo(), out, timesteps=80, seed=0, show_progress=False, suite=V1)
    pol = load_policy(out / "policy")
    m = pol.manifest
    assert m["agent"] == "ppo" and m["suite"] == V1 and m["split"] == "train"
    assert m["timesteps"] == info["timesteps"] >= 80 and m["seed"] == 0
    assert m["env"] == {
        "compute_penalty": 0.1,
        "budget_scale": 0.02,
        "freeze": [],
        "lr_scale": [1.0, 1.0],
        "obs_version": 1,
        "collapse_k": None,
        "rollback": False,
        "base_schedule": None,
    }
    assert m["train_wall_time_s"] > 0 and np.isfinite(m["mean_return"])
    assert m["recipe"]["n_steps"] == 20 and "compute is charged" in m["compute_charge"]
    recs = read_jsonl(out / "log.jsonl")
    keys = set().union(*recs)
    need = {
        "agent/episode_return",
        "agent/entropy",
        "agent/policy_loss",
        "agent/value_loss",
        "agent/fps",
        "hp/lr",
        "hp/batch_size",
        "hp/dropout",
        "val/norm_score",
        "val/loss",
        "train/loss",
        "train/steps_ratio",
    }
    assert need <= keys
    ep = next(r for r in recs if "hp/lr" in r)
    assert len(ep["trace"]["lr"]) == ep["agent/episode_length"]
    assert recs[0]["config"]["learning_rate"] == 3e-4
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    wandb_file = next(runs[0].glob("*.wandb"))
    want = [k.encode() for k in ("hp/lr", "hp/batch_size", "val/norm_score", "train/loss")]
    want.append(b"agent/entropy")
    # W&B's service process may still be flushing the offline file after finish() under load.
    deadline = time.monotonic() + 60
    while True:
        blob = wandb_file.read_bytes()  # protobuf records: metric names are stored as strings
        if all(k in blob for k in want) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [k for k in want if k not in blob] == []
    # The trained policy is a W&B Artifact, its manifest, card and sha256 in the config.
    import hashlib

    from tests.wandb_offline import read_run

    run = read_run(runs[0])
    digest = hashlib.sha256((out / "policy" / "policy.safetensors").read_bytes()).hexdigest()
    assert run.config["policy/sha256"] == digest
    assert run.config["policy/manifest"]["timesteps"] == m["timesteps"]
    assert digest in run.config["policy/card"] and "ppo" in run.config["policy/card"]
    (art,) = run.artifacts
    assert art.type == "policy" and json.loads(art.metadata)["sha256"] == digest
    names = {e.path for e in art.manifest.contents}
    assert names == {"manifest.json", "policy.safetensors", "README.md"}


def test_no_wandb_writes_only_jsonl(tmp_path):
    out = tmp_path / "run"
    train_ppo(tiny_ppo(), out, timesteps=40, seed=1, use_wandb=False, show_progress=False, suite=V1)
    assert (out / "log.jsonl").is_file() and not (out / "wandb").exists()


def test_reinforce_learns_a_policy_file(tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    outer_torch, outer_np = torch.get_rng_state(), np.random.get_state()[1].copy()
    s = ReinforceSettings(**TINY, episodes_per_batch=2, checkpoint_every_s=0)
    info = train_reinforce(
        s, tmp_path / "rf", timesteps=80, use_wandb=False, show_progress=False, suite=V1
    )
    # Seeding is local: the caller's global generators are where they were.
    assert torch.equal(torch.get_rng_state(), outer_torch)
    assert np.array_equal(np.random.get_state()[1], outer_np)
    assert "lr_scale" in dataclasses.asdict(s)  # one env config for both agents
    pol = load_policy(tmp_path / "rf" / "policy")
    assert pol.manifest["agent"] == "reinforce" and info["timesteps"] >= 80
    obs = np.zeros((3, 16), dtype=np.float32)
    assert pol.act(obs).shape == (3, 3)
    tensors, meta = load_checkpoint(tmp_path / "rf")
    assert meta["updates"] >= 2 and set(meta["baseline"]) <= set(TINY["tasks"])
    assert any(k.startswith("optim/state/") for k in tensors)
    recs = read_jsonl(tmp_path / "rf" / "log.jsonl")
    assert {"agent/entropy", "agent/policy_loss", "hp/lr", "val/norm_score"} <= set().union(*recs)


def test_checkpoint_roundtrip_optimizer_and_rng(tmp_path):
    torch.manual_seed(3)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    t, m = flatten_optimizer_state(opt.state_dict(), "optim")
    rt, rm = rng_state()
    save_checkpoint(tmp_path, {**t, **rt}, {"optimizer": m, "rng": rm, "timesteps": 7})
    assert not list(tmp_path.glob("*.tmp"))
    expect_torch, expect_np = torch.rand(3), np.random.rand(3)
    tensors, meta = load_checkpoint(tmp_path)
    opt2 = torch.optim.Adam(torch.nn.Linear(4, 2).parameters(), lr=1.0)
    opt2.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"], "optim"))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 1e-2
    for pid in a["state"]:
        for k, v in a["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][k]))
    set_rng_state(tensors, meta["rng"])
    assert torch.equal(torch.rand(3), expect_torch)
    np.testing.assert_array_equal(np.random.rand(3), expect_np)
    assert meta["timesteps"] == 7
    # not pickle, and a truncated checkpoint is a clear error
    assert (tmp_path / CHECKPOINT).read_bytes()[:2] not in (b"PK", b"\x80\x04")
    data = (tmp_path / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path)


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    for ts in (10, 20):
        save_checkpoint(tmp_path, {"w": torch.full((3,), float(ts))}, {"timesteps": ts})
    assert load_checkpoint(tmp_path)[1]["timesteps"] == 20
    last = tmp_path / CHECKPOINT
    last.write_bytes(last.read_bytes()[:40])  # e.g. a full disk when it was copied
    with pytest.warns(RuntimeWarning, match="resuming from the previous checkpoint.*10 timesteps"):
        tensors, meta = load_checkpoint(tmp_path)
    assert meta["timesteps"] == 10 and torch.equal(tensors["w"], torch.full((3,), 10.0))
    last.unlink()  # killed between the two renames of a save
    with pytest.warns(RuntimeWarning, match="is missing"):
        assert load_checkpoint(tmp_path)[1]["timesteps"] == 10
    prev = tmp_path / "checkpoint.prev.safetensors"
    prev.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no checkpoint|not a readable"):
        load_checkpoint(tmp_path)


def _cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def test_kill_then_resume_continues(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlhpo.cli", "train", "--out", str(out), "--no-wandb"]
    small = ["--set", "vec_env=dummy", "--set", "n_steps=20", "--set", "batch_size=20"]
    small += ["--set", "n_epochs=1", "--set", "checkpoint_every_s=0", *TINY_SET]
    proc = subprocess.Popen(
        [*cmd, "--timesteps", "1000000", *small],
        env=_cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        ckpt_ts = 0
        while time.monotonic() < deadline and proc.poll() is None:
            log = out / "log.jsonl"
            if log.exists():
                done = [r for r in read_jsonl(log) if r.get("event") == "checkpoint"]
                if len(done) >= 2:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, meta = load_checkpoint(out)
    ckpt_ts = meta["timesteps"]
    assert ckpt_ts > 0
    target = ckpt_ts + 80
    r = subprocess.run(
        [*cmd, "--timesteps", str(target), "--resume"],
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    recs = read_jsonl(out / "log.jsonl")
    resumed = [x for x in recs if x.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0]["timesteps"] == ckpt_ts > 0
    after = recs[recs.index(resumed[0]) :]
    first_ep = next(x for x in after if "agent/episode_return" in x)
    assert first_ep["timesteps"] > ckpt_ts and first_ep["episode"] > meta["episodes"]["episodes"]
    m = load_policy(out / "policy").manifest
    assert m["timesteps"] >= target and m["resumes"] == 1
    assert m["recipe"]["n_steps"] == 20  # the run's own settings came back
    # a second train into the same DIR without --resume is refused, nothing lost
    r = subprocess.run([*cmd, "--timesteps", "10"], env=_cli_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stdout
    assert load_policy(out / "policy").manifest["timesteps"] == m["timesteps"]


def test_resume_in_process_without_normalisation(tmp_path):
    s = tiny_ppo(norm_obs=False, norm_reward=False)
    out = tmp_path / "run"
    first = train_ppo(s, out, timesteps=40, use_wandb=False, show_progress=False, suite=V1)
    _, meta = load_checkpoint(out)
    assert meta["timesteps"] == first["timesteps"] == 40 and meta["vecnorm"] == {}
    info = train_ppo(
        s, out, timesteps=120, resume=True, use_wandb=False, show_progress=False, suite=V1
    )
    assert info["timesteps"] >= 120 and info["resumes"] == 1
    assert info["episodes"] > first["episodes"]
    net = load_policy(out / "policy").net
    assert torch.equal(net.obs_mean, torch.zeros(16)) and torch.equal(net.obs_std, torch.ones(16))


def test_policy_info_validates_weights(tmp_path):
    from rlhpo.policy import PolicyNet, save_policy

    path = save_policy(tmp_path / "p", PolicyNet(), agent="ppo", suite="default", timesteps=5)
    runner = CliRunner()
    ok = runner.invoke(app, ["policy", "info", str(path)])
    assert ok.exit_code == 0 and "weights OK" in ok.output and "ppo" in ok.output
    m = json.loads((path / "manifest.json").read_text())
    m["tensors"]["action_net.weight"]["shape"] = [12, 64]
    (path / "manifest.json").write_text(json.dumps(m))
    bad = runner.invoke(app, ["policy", "info", str(path)])
    assert (
        bad.exit_code != 0 and "action_net.weight" in bad.output and "manifest says" in bad.output
    )
    assert len(bad.output.strip().splitlines()) == 1
    save_policy(path, PolicyNet())
    w = path / "policy.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    bad = runner.invoke(app, ["policy", "info", str(path)])
    assert bad.exit_code != 0 and "not a readable safetensors" in bad.output


def test_recipes_and_overrides():
    s = load_settings("ppo", overrides=["n_envs=1", "vec_env=dummy", 'freeze=["dropout"]'])
    assert s.n_envs == 1 and s.vec_env == "dummy" and s.freeze == ("dropout",)
    assert s.hidden == (64, 64) and s.compute_penalty == 0.1
    r = load_settings("reinforce", overrides=["learning_rate=0.05"])
    assert r.learning_rate == 0.05 and r.episodes_per_batch == 4
    with pytest.raises(ValueError, match=r"unknown PPOSettings setting\(s\) \['nenvs'\]"):
        load_settings("ppo", overrides=["nenvs=1"])
    with pytest.raises(ValueError, match="n_envs must be an integer, got 'x'"):
        load_settings("ppo", overrides=["n_envs=x"])
    with pytest.raises(ValueError, match="key=value"):
        load_settings("ppo", overrides=["n_envs"])


def test_train_refuses_test_split(tmp_path):
    r = CliRunner().invoke(
        app, ["train", "--out", str(tmp_path / "x"), "--no-wandb", "--set", "split=test"]
    )
    assert r.exit_code == 2 and "test tasks are never used" in r.output


@pytest.mark.slow
def test_eval_and_plot_scripts_run(tmp_path):
    """Smoke: the committed experiment scripts run end to end on a tiny budget."""
    out = tmp_path / "run"
    train_ppo(tiny_ppo(), out, timesteps=80, seed=0, use_wandb=False, show_progress=False, suite=V1)
    root = Path(__file__).resolve().parents[1]
    md = tmp_path / "eval.md"
    r = subprocess.run(
        [
            sys.executable,
            str(root / "experiments" / "eval_policy.py"),
            "--policy",
            f"ppo={out / 'policy'}",
            "--seeds",
            "1",
            "--budget-scale",
            "0.02",
            "--tasks",
            *TINY["tasks"],
            "--out",
            str(md),
        ],
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = md.read_text()
    assert "| ppo |" in text and "| random |" in text and "| noop |" in text
    r = subprocess.run(
        [sys.executable, str(root / "experiments" / "eval_policy.py"), "--policy",
         f"ppo={out / 'policy'}", "--tasks", "breast_cancer-mlp", "--out", str(md)],
        env=_cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and "train split" in r.stderr
    png = tmp_path / "curve.png"
    r = subprocess.run(
        [sys.executable, str(root / "experiments" / "plot_training_curve.py"),
         str(out / "log.jsonl"), str(png)],
        env=_cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ppo_trains_with_observation_v2_and_its_policy_applies(tmp_path):
    from rlhpo.apply import apply_policy

    out = tmp_path / "v2"
    s = tiny_ppo(obs_version=2)
    info = train_ppo(s, out, timesteps=40, seed=0, use_wandb=False, show_progress=False, suite=V1)
    assert info["timesteps"] >= 40
    pol = load_policy(out / "policy")
    assert pol.obs_version == 2 and pol.net.obs_dim == 21
    assert pol.manifest["encoder"] == {"name": "ObservationEncoder", "version": 2, "size": 21}
    assert pol.manifest["env"]["obs_version"] == 2
    res = apply_policy(
        out / "policy", "wine-mlp", suite=V1, budget_scale=0.05,
        out_dir=tmp_path / "apply", use_wandb=False,
    )  # fmt: skip
    assert res.samples == res.budget_samples and len(res.rows) > 2
