"""Env shards as Ray actors (``--executor ray``) on a local Ray instance: the same
episodes as the local sharded env, and training that outlives a killed actor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from stable_baselines3.common.vec_env import DummyVecEnv

from rlhpo.actions import ActionCodec
from rlhpo.vec_env import ShardedVecEnv, make_vec_env

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from rlhpo.agents.ppo import PPOSettings, train_ppo  # noqa: E402
from rlhpo.ray_vec_env import ExecutorError, RayVecEnv  # noqa: E402

# Both train tasks of the tiny suite are batchable MLPs.
KW = {"suite": "tiny", "budget_scale": 0.05}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance (2 CPUs) for the module: the code under test joins it
    and leaves it running, as it does any Ray session it did not start."""
    from rlhpo.runtime import ensure_ray

    started = ensure_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def _rollout(venv, steps: int, n: int):
    rng = np.random.default_rng(0)
    venv.seed(11)
    obs = [venv.reset()]
    rews, dones, tasks = [], [], []
    for _ in range(steps):
        o, r, d, infos = venv.step(rng.integers(0, ActionCodec.NVEC, size=(n, 3)))
        obs.append(o)
        rews.append(r)
        dones.append(d)
        tasks.append([i["task"] for i in infos])
    return np.array(obs), np.array(rews), np.array(dones), tasks


# "auto" (actors stepping their envs one by one) starts two more actors: slow.
@pytest.mark.parametrize("backend", ["batched", pytest.param("auto", marks=pytest.mark.slow)])
def test_ray_vec_env_equals_the_local_sharded_env(local_ray, backend):
    # "auto" with 5 envs for 2 batchable tasks does not batch: each actor then steps
    # its envs one by one, as the local DummyVecEnv does.
    n, steps = 5, 14  # 4 intervals per episode: several auto-resets per slot
    remote = make_vec_env(n_envs=n, n_procs=2, backend=backend, monitor=False, executor="ray", **KW)
    local = make_vec_env(n_envs=n, n_procs=2, backend=backend, monitor=False, **KW)
    try:
        assert isinstance(remote, RayVecEnv) and len(remote.actors) == 2
        slot_class = "SlotEnv" if backend == "batched" else "HPOEnv"
        assert [c.__name__ for c in remote.get_attr("__class__")] == [slot_class] * n
        assert isinstance(local, ShardedVecEnv if backend == "batched" else DummyVecEnv)
        want = _rollout(local, steps, n)
        got = _rollout(remote, steps, n)
        assert got[2].sum() >= n  # every slot finished an episode and reset
        for g, w in zip(got[:3], want[:3], strict=True):
            np.testing.assert_array_equal(g, w)
        assert got[3] == want[3]
        # attribute access and methods reach the right slot of the right actor
        remote.set_attr("compute_penalty", 0.3, indices=[0, 3])
        assert remote.get_attr("compute_penalty") == [0.3, 0.1, 0.1, 0.3, 0.1]
        assert remote.get_attr("compute_penalty", indices=[4, 3]) == [0.1, 0.3]
        scores = remote.env_method("test_score", indices=[1, 4])
        assert scores == local.env_method("test_score", indices=[1, 4])
    finally:
        remote.close()
        local.close()
    assert remote.closed


def test_ray_vec_env_bad_settings_are_named(local_ray):
    with pytest.raises(ValueError, match="executor must be one of local, ray; got 'dask'"):
        make_vec_env(n_envs=2, executor="dask", **KW)
    with pytest.raises(ValueError, match="backend must be auto, batched or dummy, got 'subproc'"):
        make_vec_env(n_envs=2, backend="subproc", executor="ray", **KW)
    with pytest.raises(ValueError, match=r"n_procs must be in \[1, n_envs=2\], got 3"):
        make_vec_env(n_envs=2, n_procs=3, executor="ray", **KW)
    # the local instance has 2 CPUs and every actor holds one
    with pytest.raises(ExecutorError, match="n_procs must be <= the Ray cluster's CPUs \\(2\\)"):
        make_vec_env(n_envs=3, n_procs=3, executor="ray", **KW)


def _tiny(**kw) -> PPOSettings:
    base = dict(
        tasks=(),
        budget_scale=0.05,
        n_envs=4,
        n_procs=2,
        vec_env="batched",
        n_steps=5,
        batch_size=20,
        n_epochs=1,
        checkpoint_every_s=0.0,
    )
    return PPOSettings(**{**base, **kw})


def _kill_an_actor_at(monkeypatch, call: int, times: int) -> list[str]:
    """Kill actor 0 of the env just before its ``call``-th ``step_async`` (counted per
    env instance), in the first ``times`` env instances; returns the killed actors' ids."""
    orig = RayVecEnv.step_async
    killed: list[str] = []

    def step_async(self, actions):
        self._calls = getattr(self, "_calls", 0) + 1
        if self._calls == call and len(killed) < times:
            killed.append(self.actors[0]._actor_id.hex())
            ray.kill(self.actors[0], no_restart=True)
        orig(self, actions)

    monkeypatch.setattr(RayVecEnv, "step_async", step_async)
    return killed


def test_ppo_restarts_from_the_checkpoint_when_an_actor_dies(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    # 20 steps per rollout; a checkpoint after each update. Step 8 of the first env
    # instance is in the second rollout, after the checkpoint at 20 timesteps.
    killed = _kill_an_actor_at(monkeypatch, 8, times=1)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning) as caught:
        info = train_ppo(
            _tiny(), out, timesteps=60, seed=0, suite="tiny", show_progress=False, executor="ray"
        )
    assert len(killed) == 1
    lines = [str(w.message) for w in caught if "actor was lost" in str(w.message)]
    assert len(lines) == 1, lines
    assert "lost at 28 timesteps" in lines[0]
    assert "restarting from the checkpoint at 20 timesteps with fresh actors" in lines[0]
    assert info["timesteps"] == 60 and info["resumes"] == 1
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    lost = [r for r in log if r.get("event") == "actor_lost"]
    assert len(lost) == 1 and lost[0]["restart_from"] == 20 and lost[0]["timesteps"] == 28
    assert "died" in lost[0]["reason"].lower() or "actor" in lost[0]["reason"].lower()
    actors = [r for r in log if r.get("event") == "ray_actors"]
    assert len(actors) == 2 and all(len(r["nodes"]) == 2 for r in actors)
    resumed = [r for r in log if r.get("event") == "resume"]
    assert [r["timesteps"] for r in resumed] == [20]
    assert (out / "policy" / "manifest.json").is_file()


@pytest.mark.slow  # three rounds of actor start-up
def test_ppo_gives_up_when_actors_die_before_any_progress(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    killed = _kill_an_actor_at(monkeypatch, 1, times=5)  # each env loses one at once
    out = tmp_path / "run"
    with (
        pytest.warns(RuntimeWarning, match="restarting from the start with fresh actors"),
        pytest.raises(ExecutorError, match="lost 3 times without the run getting past timestep 0"),
    ):
        train_ppo(
            _tiny(n_envs=2, n_procs=1, batch_size=10),
            out,
            timesteps=40,
            seed=0,
            suite="tiny",
            show_progress=False,
            executor="ray",
        )
    assert len(killed) == 3
    assert not Path(out / "policy").exists()
