"""PPO (stable-baselines3) on ``rlhpo/HPO-v0``: resumable, logged, exported to a policy file.

The actor is an SB3 ``MlpPolicy`` with separate ``pi``/``vf`` networks and Tanh, so
it copies unchanged into :class:`rlhpo.policy.PolicyNet`; ``VecNormalize``'s
observation statistics become the net's ``obs_mean``/``obs_std``.

Checkpoints hold no pickle (SB3's ``.zip`` save is not used): see
:mod:`rlhpo.agents.checkpoint`. On ``--resume`` the policy, value net, optimizer,
``VecNormalize`` statistics, RNG states, timesteps and episode counters come back;
episodes that were in flight when the process died are lost and every env starts
a fresh episode (reseeded from the seed and the resumed timestep).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlhpo.agents.checkpoint import (
    flatten_optimizer_state,
    has_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_optimizer_state,
)
from rlhpo.agents.envs import EnvSettings, make_vec_env
from rlhpo.agents.episodes import EpisodeTracer
from rlhpo.agents.progress import TrainingProgress
from rlhpo.agents.recipe import settings_dict
from rlhpo.policy import PolicyNet, save_policy

COMPUTE_NOTE = (
    "compute is charged in the reward: compute_penalty * max(0, optimizer steps / steps at the "
    "task's default batch size - 1) / intervals per step (rlhpo.env.HPOEnv)"
)


@dataclass
class PPOSettings(EnvSettings):
    """PPO recipe (``rlhpo/recipes/ppo.toml``); every field can be overridden with ``--set``."""

    n_envs: int = 2
    """Parallel environments."""
    vec_env: str = "auto"
    """``auto`` (``batched`` if some task is batchable, else ``subproc``), ``batched``
    (runs of MLP/CNN tasks trained together in one process, the rest one by one in
    it), ``subproc`` (one process per env) or ``dummy`` (in-process); see the recipe."""
    n_procs: int = 1
    """Processes the batched env is sharded over (one per free core)."""
    learning_rate: float = 3e-4
    """Adam learning rate of the actor-critic."""
    n_steps: int = 128
    """Steps per env per rollout (an episode is 20 steps)."""
    batch_size: int = 64
    """Minibatch size of the PPO update."""
    n_epochs: int = 10
    """Passes over each rollout."""
    gamma: float = 1.0
    """Discount; 1 because the return then equals final minus current validation score."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """PPO ratio clip."""
    ent_coef: float = 0.01
    """Entropy bonus (keeps the policy exploring dropout and batch moves)."""
    vf_coef: float = 0.5
    """Value-loss weight."""
    max_grad_norm: float = 0.5
    """Gradient clipping norm."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden sizes of the actor and of the critic (separate networks, Tanh)."""
    norm_obs: bool = True
    """Normalise observations with running statistics (exported into the policy)."""
    norm_reward: bool = True
    """Scale rewards by a running return std (training only)."""
    checkpoint_every_s: float = 120.0
    """Seconds between checkpoints (written after a PPO update); 0: after every update."""
    log_window: int = 100
    """Episodes in the running mean return."""
    noop_bias: float = 0.0
    """Added to the initial logit of each action dimension's "keep" choice, so that
    the untrained policy's most likely action keeps everything as it is. With a
    base schedule that is the calibrated schedule itself: training starts from it
    and moves away only where the reward says so (residual policy learning)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.noop_bias):
            raise ValueError(f"noop_bias must be a finite number, got {self.noop_bias!r}")


def _build_model(s: PPOSettings, venv, seed: int):
    """SB3 PPO for the recipe, its "keep" logits raised by ``noop_bias``."""
    model = _new_ppo(s, venv, seed)
    if s.noop_bias:
        _bias_noop(model, venv, s.noop_bias)
    return model


def _bias_noop(model, venv, bias: float) -> None:
    """Raise each action dimension's "keep" logit by ``bias`` (initial policy only)."""
    import torch

    from rlhpo.actions import noop_of

    knobs = venv.get_attr("knobs", indices=[0])[0]
    noop, nvec = noop_of(knobs), model.action_space.nvec
    with torch.no_grad():
        start = 0
        for n, k in zip(nvec, noop, strict=True):
            model.policy.action_net.bias[start + int(k)] += float(bias)
            start += int(n)


def _new_ppo(s: PPOSettings, venv, seed: int):
    from stable_baselines3 import PPO

    return PPO(
        "MlpPolicy",
        venv,
        learning_rate=s.learning_rate,
        n_steps=s.n_steps,
        batch_size=s.batch_size,
        n_epochs=s.n_epochs,
        gamma=s.gamma,
        gae_lambda=s.gae_lambda,
        clip_range=s.clip_range,
        ent_coef=s.ent_coef,
        vf_coef=s.vf_coef,
        max_grad_norm=s.max_grad_norm,
        policy_kwargs={
            "net_arch": {"pi": list(s.hidden), "vf": list(s.hidden)},
            "activation_fn": nn.Tanh,
        },
        seed=seed,
        device="cpu",
        verbose=0,
    )


def normalize(venv, settings: PPOSettings):
    """``VecNormalize`` as training uses it (observation statistics go into the policy)."""
    from stable_baselines3.common.vec_env import VecNormalize

    return VecNormalize(
        venv,
        norm_obs=settings.norm_obs,
        norm_reward=settings.norm_reward,
        gamma=settings.gamma,
        # No clipping: PolicyNet normalises without clipping, so the exported policy
        # sees exactly what the trained one saw (observations are already in [-10, 10]).
        clip_obs=float("inf"),
    )


def export_policy(model, vecnorm=None) -> PolicyNet:
    """Copy an SB3 PPO actor (and VecNormalize's observation statistics) into a PolicyNet."""
    pol = model.policy
    hidden = tuple(m.out_features for m in pol.mlp_extractor.policy_net if isinstance(m, nn.Linear))
    act = pol.mlp_extractor.policy_net[1] if hidden else None
    if act is not None and not isinstance(act, nn.Tanh):
        raise ValueError(f"only Tanh actors export into PolicyNet, got {type(act).__name__}")
    net = PolicyNet(
        obs_dim=int(model.observation_space.shape[0]),
        nvec=tuple(int(n) for n in model.action_space.nvec),
        hidden=hidden,
        activation="tanh",
    )
    net.policy_net.load_state_dict(pol.mlp_extractor.policy_net.state_dict())
    net.action_net.load_state_dict(pol.action_net.state_dict())
    if vecnorm is not None and vecnorm.norm_obs:
        net.obs_mean.copy_(torch.as_tensor(vecnorm.obs_rms.mean, dtype=torch.float32))
        std = np.sqrt(vecnorm.obs_rms.var + vecnorm.epsilon)
        net.obs_std.copy_(torch.as_tensor(std, dtype=torch.float32))
    net.eval()
    return net


def _make_callback(run: _PPORun):
    from stable_baselines3.common.callbacks import BaseCallback

    class PPOCallback(BaseCallback):
        """Per-episode traces, agent metrics after each update, checkpoints, progress."""

        def __init__(self) -> None:
            super().__init__()
            self.first_rollout = True

        def _on_step(self) -> bool:
            infos, dones = self.locals["infos"], self.locals["dones"]
            for i, info in enumerate(infos):
                run.tracer.step(i, info)
                if dones[i] and "episode" in info:
                    ep = info["episode"]
                    rec = run.tracer.end(i, info, ep["r"], ep["l"])
                    run.tracker.log({**rec, "timesteps": self.num_timesteps})
            run.progress.update(self.num_timesteps, run.tracer.episodes, run.tracer.mean_return)
            return True

        def _on_rollout_start(self) -> None:
            # Called after the previous PPO update: its losses are in the logger and
            # the weights are consistent with num_timesteps, so checkpoint here.
            if self.first_rollout:
                self.first_rollout = False
                return
            run.log_agent_metrics()
            if time.monotonic() - run.last_checkpoint >= run.settings.checkpoint_every_s:
                run.checkpoint()

        def _on_training_end(self) -> None:
            run.log_agent_metrics()

    return PPOCallback()


class _PPORun:
    """State of one training session (fresh or resumed)."""

    def __init__(self, settings, out, seed, suite, target, tracker, progress, model, venv):
        self.settings, self.out, self.seed, self.suite = settings, Path(out), seed, suite
        self.target, self.tracker, self.progress = target, tracker, progress
        self.model, self.venv = model, venv
        self.tracer = EpisodeTracer(settings.n_envs, window=settings.log_window)
        self.session_start = time.monotonic()
        self.last_checkpoint = time.monotonic()
        self.wall_before = 0.0
        self.resumes = 0
        self.ts_at_start = 0

    @property
    def wall_time(self) -> float:
        return self.wall_before + time.monotonic() - self.session_start

    def log_agent_metrics(self) -> None:
        m = self.model
        vals = dict(m.logger.name_to_value)
        if "train/entropy_loss" not in vals:
            return
        elapsed = max(time.monotonic() - self.session_start, 1e-9)
        self.tracker.log(
            {
                "timesteps": m.num_timesteps,
                "agent/entropy": -float(vals["train/entropy_loss"]),
                "agent/policy_loss": float(vals.get("train/policy_gradient_loss", np.nan)),
                "agent/value_loss": float(vals.get("train/value_loss", np.nan)),
                "agent/loss": float(vals.get("train/loss", np.nan)),
                "agent/approx_kl": float(vals.get("train/approx_kl", np.nan)),
                "agent/clip_fraction": float(vals.get("train/clip_fraction", np.nan)),
                "agent/explained_variance": float(vals.get("train/explained_variance", np.nan)),
                "agent/fps": (m.num_timesteps - self.ts_at_start) / elapsed,
                "agent/mean_return": self.tracer.mean_return,
                "agent/episodes": self.tracer.episodes,
            }
        )

    def checkpoint(self) -> None:
        m, vn = self.model, self.venv
        tensors = {f"policy/{k}": v for k, v in m.policy.state_dict().items()}
        opt_t, opt_meta = flatten_optimizer_state(m.policy.optimizer.state_dict(), "optim")
        tensors.update(opt_t)
        rng_t, rng_meta = rng_state()
        tensors.update(rng_t)
        vn_meta: dict[str, Any] = {}
        if vn is not None:
            for name in ("obs_rms", "ret_rms"):
                rms = getattr(vn, name)
                tensors[f"vecnorm/{name}/mean"] = torch.as_tensor(np.asarray(rms.mean))
                tensors[f"vecnorm/{name}/var"] = torch.as_tensor(np.asarray(rms.var))
                vn_meta[name] = float(rms.count)
        meta = {
            "agent": "ppo",
            "suite": self.suite,
            "seed": self.seed,
            "settings": settings_dict(self.settings),
            "timesteps": int(m.num_timesteps),
            "target_timesteps": int(self.target),
            "wall_time": self.wall_time,
            "resumes": self.resumes,
            "episodes": self.tracer.state(),
            "optimizer": opt_meta,
            "rng": rng_meta,
            "vecnorm": vn_meta,
        }
        save_checkpoint(self.out, tensors, meta)
        self.last_checkpoint = time.monotonic()
        self.tracker.log(
            {"event": "checkpoint", "timesteps": int(m.num_timesteps), "wall_time": self.wall_time}
        )

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        m, vn = self.model, self.venv
        m.policy.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("policy/")})
        m.policy.optimizer.load_state_dict(
            unflatten_optimizer_state(tensors, meta["optimizer"], "optim")
        )
        if vn is not None:
            for name, count in meta["vecnorm"].items():
                rms = getattr(vn, name)
                rms.mean = tensors[f"vecnorm/{name}/mean"].numpy().astype(np.float64)
                rms.var = tensors[f"vecnorm/{name}/var"].numpy().astype(np.float64)
                rms.count = count
        m.num_timesteps = int(meta["timesteps"])
        self.ts_at_start = m.num_timesteps
        self.tracer.load_state(meta["episodes"])
        self.wall_before = float(meta["wall_time"])
        self.resumes = int(meta.get("resumes", 0)) + 1
        # Episodes in flight at the kill are gone: every env restarts from a fresh
        # reset, seeded so a resumed run does not replay the episodes it began with.
        m.get_env().seed(self.seed + int(meta["timesteps"]))
        set_rng_state(tensors, meta["rng"])


def train_ppo(
    settings: PPOSettings,
    out: str | Path,
    *,
    timesteps: int,
    seed: int = 0,
    suite: str = "default",
    resume: bool = False,
    use_wandb: bool = True,
    show_progress: bool = True,
    console=None,
    command: str | None = None,
    executor: str = "local",
    address: str | None = None,
) -> dict[str, Any]:
    """Train PPO for ``timesteps`` env steps in all (counting any resumed ones) and save
    the policy to ``out/policy``. Returns the manifest fields written.

    ``executor="ray"`` steps the env shards (``n_procs`` of them) in Ray actors on the
    cluster at ``address`` (default: a local Ray instance); the learner stays here. If
    an actor is lost, training goes on from the last checkpoint with fresh actors
    (from the start if none was written yet), and the log says so."""
    out = Path(out)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(out)
        if ckpt[1].get("agent") != "ppo":
            raise ValueError(f"{out}: checkpoint is for agent {ckpt[1].get('agent')!r}, not ppo")
        # The run goes on with the settings it started with.
        from rlhpo.agents.recipe import build_settings

        settings = build_settings(PPOSettings, ckpt[1]["settings"])
        seed, suite = int(ckpt[1]["seed"]), str(ckpt[1]["suite"])
    _check(settings, timesteps)
    check_executor(settings, executor, address)
    if executor == "ray":
        from rlhpo.ray_vec_env import ray_session

        session: Any = ray_session(address, num_cpus=settings.n_procs)
    else:
        session = contextlib.nullcontext()
    with session:
        return _train(
            settings,
            out,
            ckpt,
            timesteps=timesteps,
            seed=seed,
            suite=suite,
            use_wandb=use_wandb,
            show_progress=show_progress,
            console=console,
            command=command,
            executor=executor,
        )


def _open_envs(settings: PPOSettings, suite: str, seed: int, executor: str):
    """The training vector env (normalised if the recipe says so) and its VecNormalize."""
    venv = make_vec_env(
        settings.env_config(suite),
        n_envs=settings.n_envs,
        seed=seed,
        backend=settings.vec_env,
        n_procs=settings.n_procs,
        executor=executor,
    )
    vn = None
    if settings.norm_obs or settings.norm_reward:
        vn = venv = normalize(venv, settings)
    return venv, vn


def _log_actors(tracker, venv, console) -> None:
    """Where the env actors run (Ray executor): one log record, one console line."""
    inner = venv.unwrapped
    nodes = getattr(inner, "nodes", None)
    if nodes is None:
        return
    tracker.log({"event": "ray_actors", "nodes": list(nodes), "hosts": list(inner.hosts)})
    if console is not None:
        console.print(f"ray: {len(nodes)} env actors on {len(set(nodes))} node(s)", highlight=False)


# Actors lost this many times in a row without the run getting past the checkpoint
# it restarted from: the cluster cannot hold them, so stop instead of looping.
MAX_RESTARTS_WITHOUT_PROGRESS = 3


def _train(
    settings: PPOSettings,
    out: Path,
    ckpt,
    *,
    timesteps: int,
    seed: int,
    suite: str,
    use_wandb: bool,
    show_progress: bool,
    console,
    command: str | None,
    executor: str,
) -> dict[str, Any]:
    from rlhpo.tracking import Tracker

    lost: tuple[type[BaseException], ...] = ()
    if executor == "ray":
        from rlhpo.ray_vec_env import ExecutorError, actor_lost_errors

        lost = actor_lost_errors()
    venv, vn = _open_envs(settings, suite, seed, executor)
    config = {
        "agent": "ppo",
        "suite": suite,
        "seed": seed,
        "timesteps": timesteps,
        "executor": executor,
        **settings_dict(settings),
    }
    tracker = Tracker(
        out, config=config, use_wandb=use_wandb, group="train-ppo", name=out.name, job_type="train"
    )
    restarts: list[int] = []  # the timesteps each restart went back to
    try:
        with TrainingProgress(timesteps, console=console, enabled=show_progress) as progress:
            while True:
                _log_actors(tracker, venv, console)
                model = _build_model(settings, venv, seed)
                run = _PPORun(settings, out, seed, suite, timesteps, tracker, progress, model, vn)
                if ckpt is not None:
                    run.restore(*ckpt)
                    tracker.log({"event": "resume", "timesteps": model.num_timesteps})
                    progress.update(
                        model.num_timesteps, run.tracer.episodes, run.tracer.mean_return
                    )
                remaining = timesteps - model.num_timesteps
                try:
                    if remaining > 0:
                        model.learn(
                            total_timesteps=remaining,
                            callback=_make_callback(run),
                            reset_num_timesteps=ckpt is None,
                            log_interval=1,
                        )
                    break
                except lost as e:
                    venv.close()
                    ckpt = load_checkpoint(out) if has_checkpoint(out) else None
                    back_to = int(ckpt[1]["timesteps"]) if ckpt is not None else 0
                    restarts.append(back_to)
                    reason = str(e).strip().splitlines()[0]
                    if (
                        restarts[-MAX_RESTARTS_WITHOUT_PROGRESS:]
                        == [back_to] * MAX_RESTARTS_WITHOUT_PROGRESS
                    ):
                        raise ExecutorError(
                            f"env actors were lost {MAX_RESTARTS_WITHOUT_PROGRESS} times without "
                            f"the run getting past timestep {back_to}; last: {reason}"
                        ) from e
                    where = f"the checkpoint at {back_to} timesteps" if ckpt else "the start"
                    line = (
                        f"a Ray env actor was lost at {model.num_timesteps} timesteps "
                        f"({reason}); restarting from {where} with fresh actors"
                    )
                    tracker.log(
                        {
                            "event": "actor_lost",
                            "timesteps": int(model.num_timesteps),
                            "restart_from": back_to,
                            "reason": reason,
                        }
                    )
                    if console is not None:
                        console.print(f"warning: {line}", highlight=False, soft_wrap=True)
                    else:
                        warnings.warn(line, RuntimeWarning, stacklevel=2)
                    venv, vn = _open_envs(settings, suite, seed, executor)
            run.checkpoint()
        net = export_policy(model, vn)
        info = {
            "suite": suite,
            "split": settings.split,
            "tasks": list(settings.tasks) or None,
            "agent": "ppo",
            "timesteps": int(model.num_timesteps),
            "episodes": run.tracer.episodes,
            "seed": seed,
            "train_wall_time_s": round(run.wall_time, 1),
            "mean_return": run.tracer.mean_return,
            "mean_final_val_norm_score": float(np.mean(run.tracer.final_scores))
            if run.tracer.final_scores
            else None,
            "mean_over_episodes": len(run.tracer.returns),
            "env": settings.env_record(settings.env_config(suite)),
            "freeze": list(settings.freeze),
            "compute_charge": COMPUTE_NOTE,
            "resumes": run.resumes,
            "command": command,
            "recipe": settings_dict(settings),
        }
        knobs = venv.get_attr("knobs", indices=[0])[0]
        save_policy(out / "policy", net, knobs=knobs, obs_version=settings.obs_version, **info)
        tracker.log_policy(out / "policy")
        tracker.summary(
            {
                "agent/mean_return": run.tracer.mean_return,
                "agent/timesteps": int(model.num_timesteps),
                "agent/episodes": run.tracer.episodes,
                "agent/train_wall_time_s": run.wall_time,
            }
        )
        return info
    finally:
        tracker.finish()
        venv.close()


def check_executor(s: PPOSettings, executor: str, address: str | None) -> None:
    """What ``executor`` (and ``address``) can run: a ``ValueError`` saying what to change."""
    from rlhpo.vec_env import EXECUTORS

    if executor not in EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if address and executor != "ray":
        raise ValueError(
            f"--address applies to --executor ray only, got --address {address} with "
            f"--executor {executor}"
        )
    if executor == "ray" and s.vec_env == "subproc":
        raise ValueError(
            "--executor ray steps env shards in Ray actors (each in its actor's process): "
            f"vec_env must be auto, batched or dummy, got vec_env={s.vec_env!r} "
            "(set --set vec_env=dummy, or use --executor local)"
        )


def _check(s: PPOSettings, timesteps: int) -> None:
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    if s.split == "test":
        raise ValueError("split must not be 'test': test tasks are never used to train a policy")
    if s.n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {s.n_envs}")
    if s.n_steps * s.n_envs < s.batch_size:
        raise ValueError(
            f"batch_size must be <= n_steps * n_envs = {s.n_steps * s.n_envs}, got {s.batch_size}"
        )
