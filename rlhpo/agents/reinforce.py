"""REINFORCE with a baseline, in one file you can read top to bottom (CleanRL style).

The policy is a :class:`rlhpo.policy.PolicyNet` trained directly, so what is saved
is exactly what was trained. Variance reduction: the baseline for step ``t`` of a
task's episode is a running mean (exponential moving average) of the return-to-go
seen at that step of that task, and the advantages of each batch are normalised
to zero mean and unit std. Observations are used as the encoder gives them
(scale-free, clipped to [-10, 10]); the net's ``obs_mean``/``obs_std`` stay 0/1.

Resumable like PPO (no pickle, see :mod:`rlhpo.agents.checkpoint`): a checkpoint
after a policy update holds the net, Adam's state, the baseline table, RNG states,
timesteps and episode counters. An episode in flight when the process died is
lost; the resumed run starts a fresh one (env reseeded from seed + timesteps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhpo.agents.checkpoint import (
    flatten_optimizer_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from rlhpo.agents.envs import EnvSettings, make_env
from rlhpo.agents.episodes import EpisodeTracer
from rlhpo.agents.ppo import COMPUTE_NOTE
from rlhpo.agents.progress import TrainingProgress
from rlhpo.agents.recipe import build_settings, settings_dict
from rlhpo.policy import PolicyNet, save_policy


@dataclass
class ReinforceSettings(EnvSettings):
    """REINFORCE recipe (``rlhpo/recipes/reinforce.toml``); override any field with ``--set``."""

    learning_rate: float = 1e-2
    """Adam learning rate of the policy."""
    episodes_per_batch: int = 4
    """Episodes per policy-gradient update."""
    gamma: float = 1.0
    """Discount of the return-to-go (1: final minus current validation score)."""
    ent_coef: float = 0.01
    """Entropy bonus weight."""
    baseline_decay: float = 0.9
    """EMA decay of the per-(task, step) return-to-go baseline."""
    normalize_advantages: bool = True
    """Scale each batch's advantages to zero mean, unit std."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden sizes of the policy MLP (Tanh)."""
    checkpoint_every_s: float = 120.0
    """Seconds between checkpoints (written after an update); 0: after every update."""
    log_window: int = 100
    """Episodes in the running mean return."""


def train_reinforce(
    settings: ReinforceSettings,
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
) -> dict[str, Any]:
    """Train for ``timesteps`` env steps in all (counting resumed ones); save ``out/policy``."""
    from rlhpo.tracking import Tracker

    out = Path(out)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(out)
        if ckpt[1].get("agent") != "reinforce":
            raise ValueError(
                f"{out}: checkpoint is for agent {ckpt[1].get('agent')!r}, not reinforce"
            )
        settings = build_settings(ReinforceSettings, ckpt[1]["settings"])
        seed, suite = int(ckpt[1]["seed"]), str(ckpt[1]["suite"])
    s = settings
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    if s.episodes_per_batch < 1:
        raise ValueError(f"episodes_per_batch must be >= 1, got {s.episodes_per_batch}")

    # --- setup: seeding, env, policy, optimizer ---------------------------------
    # Local generators only: the user's global RNGs are left as they are.
    env = make_env(s.env_config(suite))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = PolicyNet(
            obs_dim=env.observation_space.shape[0],
            nvec=tuple(int(n) for n in env.action_space.nvec),
            hidden=tuple(s.hidden),
            activation="tanh",
        )
    sampler = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=s.learning_rate)
    baseline: dict[str, list[float | None]] = {}  # task -> running return-to-go per step
    tracer = EpisodeTracer(1, window=s.log_window)
    global_step, updates, wall_before, resumes = 0, 0, 0.0, 0
    reset_seed: int | None = seed

    if ckpt is not None:
        tensors, meta = ckpt
        net.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("policy/")})
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"], "optim"))
        baseline = meta["baseline"]
        tracer.load_state(meta["episodes"])
        global_step, updates = int(meta["timesteps"]), int(meta["updates"])
        wall_before, resumes = float(meta["wall_time"]), int(meta.get("resumes", 0)) + 1
        if "rng/sampler" in tensors:
            sampler.set_state(tensors["rng/sampler"])
        # The episode in flight at the kill is lost: start a fresh one.
        reset_seed = seed + global_step

    config = {"agent": "reinforce", "suite": suite, "seed": seed, "timesteps": timesteps}
    config.update(settings_dict(s))
    tracker = Tracker(
        out,
        config=config,
        use_wandb=use_wandb,
        group="train-reinforce",
        name=out.name,
        job_type="train",
    )
    session_start = last_ckpt = time.monotonic()
    step_at_start = global_step

    def wall_time() -> float:
        return wall_before + time.monotonic() - session_start

    def checkpoint() -> None:
        nonlocal last_ckpt
        tensors = {f"policy/{k}": v for k, v in net.state_dict().items()}
        opt_t, opt_meta = flatten_optimizer_state(optimizer.state_dict(), "optim")
        rng_t, rng_meta = {"rng/sampler": sampler.get_state()}, {}
        meta = {
            "agent": "reinforce",
            "suite": suite,
            "seed": seed,
            "settings": settings_dict(s),
            "timesteps": global_step,
            "target_timesteps": timesteps,
            "updates": updates,
            "wall_time": wall_time(),
            "resumes": resumes,
            "episodes": tracer.state(),
            "baseline": baseline,
            "optimizer": opt_meta,
            "rng": rng_meta,
        }
        save_checkpoint(out, {**tensors, **opt_t, **rng_t}, meta)
        last_ckpt = time.monotonic()
        tracker.log({"event": "checkpoint", "timesteps": global_step, "wall_time": wall_time()})

    try:
        if ckpt is not None:
            tracker.log({"event": "resume", "timesteps": global_step})
        with TrainingProgress(timesteps, global_step, console, show_progress) as progress:
            progress.update(global_step, tracer.episodes, tracer.mean_return)
            while global_step < timesteps:
                # --- collect a batch of episodes with the current (stochastic) policy ---
                logps, ents, advs = [], [], []
                for _ in range(s.episodes_per_batch):
                    obs, info = env.reset(seed=reset_seed)
                    reset_seed = None  # later resets continue the env's own generator
                    task = info["task"]
                    ep_logp, ep_ent, rewards = [], [], []
                    done = False
                    while not done:
                        dists = net.distributions(torch.as_tensor(obs).unsqueeze(0))
                        action = torch.stack(
                            [
                                torch.multinomial(d.probs, 1, generator=sampler).squeeze(-1)
                                for d in dists
                            ],
                            -1,
                        )
                        ep_logp.append(
                            sum(
                                d.log_prob(a) for d, a in zip(dists, action.unbind(-1), strict=True)
                            )
                        )
                        ep_ent.append(sum(d.entropy() for d in dists))
                        obs, r, term, trunc, info = env.step(action.squeeze(0).numpy())
                        rewards.append(float(r))
                        tracer.step(0, info)
                        done = term or trunc
                        global_step += 1
                    ep = info["episode"]  # from Monitor
                    rec = tracer.end(0, info, ep["r"], ep["l"])
                    tracker.log({**rec, "timesteps": global_step})
                    progress.update(global_step, tracer.episodes, tracer.mean_return)

                    # --- returns-to-go and the per-(task, step) running-mean baseline ---
                    G, ret = np.zeros(len(rewards)), 0.0
                    for t in reversed(range(len(rewards))):
                        ret = rewards[t] + s.gamma * ret
                        G[t] = ret
                    row = baseline.setdefault(task, [])
                    adv = np.empty_like(G)
                    for t, g in enumerate(G):
                        if len(row) <= t:
                            row.append(None)
                        b = row[t]
                        adv[t] = g - (b if b is not None else g)
                        row[t] = (
                            g if b is None else s.baseline_decay * b + (1 - s.baseline_decay) * g
                        )
                    logps.append(torch.cat(ep_logp))
                    ents.append(torch.cat(ep_ent))
                    advs.append(adv)

                # --- one policy-gradient step -------------------------------------
                logp, ent = torch.cat(logps), torch.cat(ents)
                adv = torch.as_tensor(np.concatenate(advs), dtype=torch.float32)
                if s.normalize_advantages and adv.numel() > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = -(logp * adv).mean()
                loss = pg_loss - s.ent_coef * ent.mean()
                optimizer.zero_grad()
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), s.max_grad_norm)
                optimizer.step()
                updates += 1

                elapsed = max(time.monotonic() - session_start, 1e-9)
                tracker.log(
                    {
                        "timesteps": global_step,
                        "agent/policy_loss": pg_loss.item(),
                        "agent/entropy": ent.mean().item(),
                        "agent/loss": loss.item(),
                        "agent/grad_norm": float(grad_norm),
                        "agent/fps": (global_step - step_at_start) / elapsed,
                        "agent/mean_return": tracer.mean_return,
                        "agent/episodes": tracer.episodes,
                        "agent/updates": updates,
                    }
                )
                if time.monotonic() - last_ckpt >= s.checkpoint_every_s:
                    checkpoint()
        checkpoint()

        # --- save the policy -----------------------------------------------------
        net.eval()
        info = {
            "suite": suite,
            "split": s.split,
            "tasks": list(s.tasks) or None,
            "agent": "reinforce",
            "timesteps": global_step,
            "episodes": tracer.episodes,
            "seed": seed,
            "train_wall_time_s": round(wall_time(), 1),
            "mean_return": tracer.mean_return,
            "mean_final_val_norm_score": float(np.mean(tracer.final_scores))
            if tracer.final_scores
            else None,
            "mean_over_episodes": len(tracer.returns),
            "env": s.env_record(env.unwrapped.config),
            "freeze": list(s.freeze),
            "compute_charge": COMPUTE_NOTE,
            "resumes": resumes,
            "command": command,
            "recipe": settings_dict(s),
        }
        save_policy(
            out / "policy", net, knobs=env.unwrapped.knobs, obs_version=s.obs_version, **info
        )
        tracker.log_policy(out / "policy")
        tracker.summary(
            {
                "agent/mean_return": tracer.mean_return,
                "agent/timesteps": global_step,
                "agent/episodes": tracer.episodes,
                "agent/train_wall_time_s": wall_time(),
            }
        )
        return info
    finally:
        tracker.finish()
        env.close()
