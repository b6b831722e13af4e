"""Vine: policy improvement from branch rollouts with common random numbers, in one file.

Whole-episode returns from the few hundred episodes these machines afford cannot
tell a good move from noise (PPO over the prior never left "keep", issue #22).
This agent measures each move instead. At sampled decision points of a run it
saves the run, continues it once per candidate learning-rate move, and lets every
branch follow the current policy to the end (:func:`rlhpo.branching.branch`). The
branches share the data order and dropout masks, so ``A(s, a) = G(a) - G(keep)``
is what the move changed (TRPO's "vine" estimator, Schulman et al. 2015).

The update is the vine's: maximise ``sum_a pi(a|s) (A(s, a) - c [a != keep])`` over
every branched state, with a KL penalty to the round's starting policy and an early
stop at ``kl_target`` (the PPO-penalty form of a trust region). ``c`` (``move_cost``)
is the price of leaving the prior: a move must beat "keep" by more than the noise
of a branch to be learned. Round 1 follows the prior ("keep", the tuned schedule),
so a one-round run learns where a single move away from the prior pays.

Episodes come from a curriculum on the prior's failures (:class:`Curriculum`): a
share drawn from the target distribution (a task uniformly, the env's lr factor
log-uniformly), the rest in proportion to the prior's measured regret per (task, lr
factor) (``curriculum``, committed by ``experiments/transfer/regret.py``). Each state
carries its episode's importance weight (target over mixture density), so the update
optimises the target distribution: unweighted, the curriculum's many too-low-lr runs
taught "raise the lr at once" everywhere (measured on the first collection: every
move's mean advantage was <= 0 on the uniform draws, x4's +0.06 on the regret draws).

With ``ensemble = K`` the round fits K nets, each on a bootstrap resample of the
episodes, and saves them as one :class:`rlhpo.policy.ConsensusNet` that moves only where
all K make the same move. Where the branch data decide, resamples agree; where a net
extrapolates (states unlike any branched one), they disagree and the prior keeps.

Resumable without pickle: every finished episode (its branched states and
advantages) is one JSON line of ``branches.jsonl`` and its content depends only on
(seed, round, index, the round's policy), so a run killed at any moment resumes
by collecting the episodes its file lacks: none twice, none lost. The policy after
each round is in ``checkpoint.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhpo.actions import noop_of
from rlhpo.agents.checkpoint import load_checkpoint, save_checkpoint
from rlhpo.agents.envs import EnvSettings
from rlhpo.agents.ppo import COMPUTE_NOTE
from rlhpo.agents.recipe import build_settings, settings_dict
from rlhpo.knobs import LR, order_knobs
from rlhpo.policy import MAX_MEMBERS, ConsensusNet, PolicyNet, build_net, save_policy

BRANCHES = "branches.jsonl"


@dataclass
class VineSettings(EnvSettings):
    """Vine recipe (``rlhpo/recipes/vine.toml``); override any field with ``--set``."""

    rounds: int = 1
    """Collect-then-update rounds; round r's branches follow round r-1's policy."""
    episodes_per_round: int = 160
    """Episodes collected per round (each with ``branch_points`` branched states)."""
    branch_points: int = 2
    """Decisions branched per episode, drawn among those before ``branch_until``."""
    branch_from: int = 1
    """First decision that may be branched (decision 0 sees the untrained model: there
    is no response to react to yet, only a schedule to memorise)."""
    branch_until: float = 0.5
    """Only decisions before this budget fraction are branched (rescues come early)."""
    move_cost: float = 0.05
    """Subtracted from the advantage of every move that leaves "keep" (do no harm)."""
    uniform_share: float = 0.5
    """Share of episodes drawn uniformly; the rest in proportion to the prior's regret."""
    unscaled_share: float = 0.0
    """Share of the target distribution's episodes with no lr factor (exactly 1): the
    tuned peak is right for most tasks in use, and a policy that never sees such runs
    learns to move where "keep" was right. 0 = the factor is log-uniform throughout."""
    curriculum: str = "regret-default.json"
    """Regret of the prior per (task, lr factor), in ``rlhpo/recipes/``; "" = uniform."""
    learning_rate: float = 3e-3
    """Adam step of the policy update."""
    update_steps: int = 300
    """Full-batch gradient steps per round (fewer when ``kl_target`` is reached)."""
    kl_coef: float = 0.1
    """Weight of KL(round's starting policy || policy) in the update."""
    kl_target: float = 1.0
    """Mean KL at which a round's update stops."""
    weight_decay: float = 1e-4
    """AdamW weight decay of the policy update."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden sizes of the policy MLP (Tanh)."""
    noop_bias: float = 2.0
    """The initial "keep" logit (the last layer starts at zero: round 1 follows the prior)."""
    workers: int = 2
    """Processes collecting episodes (one torch thread each)."""
    support_window: bool = False
    """Act only within the budget fractions the branched states covered (the policy
    file's ``architecture.window``); before and after, "keep". The update never sees
    decision 0 (``branch_from``) or the second half (``branch_until``), so what the net
    does there is extrapolation."""
    ensemble: int = 0
    """0: one net. K >= 2: K nets, each fitted on a bootstrap resample of the episodes,
    saved as one consensus policy that moves only where all K make the same move
    (:class:`rlhpo.policy.ConsensusNet`); one round only."""
    quorum: int = 0
    """With ``ensemble``: the members that must make the same move for the policy to
    move (more than half of them); 0 = all of them."""

    def __post_init__(self) -> None:
        def need(ok: bool, what: str, v: Any) -> None:
            if not ok:
                raise ValueError(f"{what}, got {v!r}")

        need(self.rounds >= 1, "rounds must be >= 1", self.rounds)
        need(
            self.episodes_per_round >= 1, "episodes_per_round must be >= 1", self.episodes_per_round
        )
        need(self.branch_points >= 1, "branch_points must be >= 1", self.branch_points)
        need(0 < self.branch_until <= 1, "branch_until must be in (0, 1]", self.branch_until)
        need(self.branch_from >= 0, "branch_from must be >= 0", self.branch_from)
        need(
            math.isfinite(self.move_cost) and self.move_cost >= 0,
            "move_cost must be a finite number >= 0",
            self.move_cost,
        )
        need(0 <= self.uniform_share <= 1, "uniform_share must be in [0, 1]", self.uniform_share)
        need(0 <= self.unscaled_share < 1, "unscaled_share must be in [0, 1)", self.unscaled_share)
        lo, hi = (float(v) for v in self.lr_scale)
        need(
            self.unscaled_share == 0 or lo <= 1 <= hi,
            "unscaled_share > 0 needs an lr_scale range that contains 1",
            list(self.lr_scale),
        )
        for name in ("learning_rate", "kl_coef", "kl_target"):
            v = getattr(self, name)
            need(math.isfinite(v) and v > 0, f"{name} must be a finite number > 0", v)
        need(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay must be a finite number >= 0",
            self.weight_decay,
        )
        need(self.update_steps >= 1, "update_steps must be >= 1", self.update_steps)
        need(math.isfinite(self.noop_bias), "noop_bias must be a finite number", self.noop_bias)
        need(self.workers >= 1, "workers must be >= 1", self.workers)
        need(
            isinstance(self.support_window, bool),
            "support_window must be true or false",
            self.support_window,
        )
        need(
            _int(self.ensemble) and (self.ensemble == 0 or 2 <= self.ensemble <= MAX_MEMBERS),
            f"ensemble must be 0 (one net) or 2 to {MAX_MEMBERS} members",
            self.ensemble,
        )
        need(
            self.ensemble == 0 or self.rounds == 1,
            "ensemble needs rounds = 1 (its members are fitted once, on round 1's episodes)",
            self.rounds,
        )
        need(
            _int(self.quorum)
            and (
                self.quorum == 0
                or (self.ensemble and self.ensemble // 2 < self.quorum <= self.ensemble)
            ),
            "quorum must be 0 (all members) or, with ensemble, more than half of its members "
            "and at most all (with ensemble = 0, set quorum = 0 too)",
            self.quorum,
        )
        load_curriculum(self.curriculum, [])  # a missing or malformed file fails here, not mid-run
        need(
            len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
            "hidden must be a list of sizes >= 1",
            list(self.hidden),
        )


# ----------------------------------------------------------------------------------
# The curriculum: which (task, lr factor) an episode trains
# ----------------------------------------------------------------------------------
def load_curriculum(name: str, tasks: list[str]) -> list[tuple[str, float, float]]:
    """``(task, lr factor, regret)`` rows of a curriculum file (in the recipes folder,
    or a path), restricted to ``tasks``; [] for ``""``."""
    if not name:
        return []
    from rlhpo.shipped import recipes_dir

    p = Path(name) if os.path.sep in name else recipes_dir() / name
    if not p.is_file():
        raise ValueError(f"curriculum file {p} does not exist")
    try:
        raw = json.loads(p.read_text())
        rows = [(str(r["task"]), float(r["lr_scale"]), float(r["regret"])) for r in raw["rows"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"curriculum file {p}: expected {{'rows': [{{task, lr_scale, regret}}]}} ({e})"
        ) from None
    bad = [r for r in rows if not (r[1] > 0 and math.isfinite(r[2]) and r[2] >= 0)]
    if bad:
        raise ValueError(f"curriculum file {p}: lr_scale must be > 0 and regret >= 0, got {bad[0]}")
    keep = set(tasks)
    return [r for r in rows if r[0] in keep]


@dataclass(frozen=True)
class Curriculum:
    """Where episodes come from: a defensive mixture (Hesterberg 1995).

    A ``uniform_share`` of the episodes is drawn from the target distribution (a task
    uniformly; the lr factor exactly 1 with probability ``unscaled_share``, else
    log-uniformly over ``lr_scale``); the rest from the prior's
    failures: a (task, lr-factor bin) in proportion to the prior's regret there, the
    factor log-uniformly within the bin (the bins split ``lr_scale`` at the geometric
    midpoints of the regret grid). :meth:`weight` is the target density over the
    mixture's, at most ``1 / uniform_share``: the weighted update optimises the target
    distribution while the curriculum supplies the failures to learn from.
    """

    tasks: tuple[str, ...]
    lo: float
    hi: float
    uniform_share: float
    cells: tuple[tuple[str, float, float, float], ...] = ()
    """(task, bin low, bin high, probability) of the regret part."""
    unscaled_share: float = 0.0
    """Probability of the factor 1 exactly in the target distribution."""

    @classmethod
    def build(
        cls, tasks: list[str], lr_scale, uniform_share: float, rows, unscaled_share: float = 0.0
    ) -> Curriculum:
        lo, hi = (float(v) for v in lr_scale)
        p1 = float(unscaled_share) if hi > lo else 0.0
        grid = sorted({c for _, c, _ in rows if lo <= c <= hi})
        if hi <= lo or not grid:
            return cls(tuple(tasks), lo, hi, 1.0, (), p1)
        edges = [lo, *(math.sqrt(a * b) for a, b in zip(grid, grid[1:], strict=False)), hi]
        cell = {c: (edges[i], edges[i + 1]) for i, c in enumerate(grid)}
        raw = [(t, *cell[c], r) for t, c, r in rows if c in cell and r > 0 and t in tasks]
        total = sum(r for *_, r in raw)
        if total <= 0:
            return cls(tuple(tasks), lo, hi, 1.0, (), p1)
        cells = tuple((t, a, b, r / total) for t, a, b, r in raw)
        return cls(tuple(tasks), lo, hi, float(uniform_share), cells, p1)

    def draw(self, rng: np.random.Generator) -> tuple[str, float]:
        """One (task, lr factor) from the mixture."""
        if self.cells and rng.random() >= self.uniform_share:
            p = np.array([c[3] for c in self.cells])
            t, a, b, _ = self.cells[int(rng.choice(len(self.cells), p=p / p.sum()))]
        else:
            t, a, b = self.tasks[int(rng.integers(len(self.tasks)))], self.lo, self.hi
            # only drawn when set, so a recipe without it draws exactly as before
            if self.unscaled_share > 0 and rng.random() < self.unscaled_share:
                return t, 1.0
        c = float(math.exp(rng.uniform(math.log(a), math.log(b)))) if b > a else float(a)
        return t, c

    def weight(self, task: str, c: float) -> float:
        """Target density over mixture density at (task, lr factor)."""
        if not self.cells:
            return 1.0
        if self.unscaled_share > 0 and c == 1.0:
            # the point mass: the regret part never draws exactly 1
            return 1.0 / self.uniform_share
        target = (1 - self.unscaled_share) / (len(self.tasks) * math.log(self.hi / self.lo))
        regret = sum(
            p / math.log(b / a)
            for t, a, b, p in self.cells
            if t == task and (a <= c < b or (c == b == self.hi))
        )
        u = self.uniform_share
        return target / (u * target + (1 - u) * regret)


def draw_episode(s: VineSettings, seed: int, rnd: int, index: int, cur: Curriculum) -> dict:
    """The task, lr factor, importance weight, env seed and branch-point seed of one
    episode: a pure function of (seed, round, index), so a resumed run draws the same."""
    rng = np.random.default_rng([seed, rnd, index])
    task, c = cur.draw(rng)
    return {
        "task": task,
        "lr_scale": c,
        "weight": cur.weight(task, c),
        "env_seed": int(rng.integers(2**31 - 1)),
        "pick": int(rng.integers(2**31 - 1)),
    }


# ----------------------------------------------------------------------------------
# Collection (worker processes)
# ----------------------------------------------------------------------------------
_ENV: dict[str, Any] = {}


def _worker_env(config):
    """One env per worker process (the suite's data is generated once)."""
    from rlhpo.env import HPOEnv

    key = repr(config)
    if key not in _ENV:
        torch.set_num_threads(1)
        _ENV.clear()
        _ENV[key] = HPOEnv(config)
    return _ENV[key]


def collect_episode(
    config, s: VineSettings, job: dict[str, Any], net_state: dict | None, arch: dict[str, Any]
) -> dict[str, Any]:
    """Run one episode under the policy; branch every lr move at the drawn decisions."""
    from rlhpo.branching import branch

    t0 = time.perf_counter()
    env = _worker_env(config)
    net = _net_from(arch, net_state)
    follow = (lambda o: net.act(o)) if net_state is not None else None
    obs, info = env.reset(
        seed=job["env_seed"], options={"task": job["task"], "lr_scale": job["lr_scale"]}
    )
    intervals = env.spec_task.intervals
    last = min(intervals, max(int(s.branch_until * intervals), s.branch_from + 1))
    rng = np.random.default_rng(job["pick"])
    where = np.arange(s.branch_from, last)
    points = set(rng.choice(where, size=min(s.branch_points, where.size), replace=False).tolist())
    lr_dim = env.codec.knobs.index(LR.name)
    n_lr = env.codec.nvec[lr_dim]
    noop = np.asarray(env.codec.noop)
    states, taken, steps = [], [], 0
    for k in range(intervals):
        if k in points:
            moves = []
            for j in range(n_lr):
                a = noop.copy()
                a[lr_dim] = j
                moves.append(a)
            bs = branch(env, moves, follow=follow)
            steps += sum(b.steps for b in bs)
            keep = bs[int(noop[lr_dim])].ret
            states.append(
                {
                    "k": k,
                    "frac": info["samples"] / info["budget_samples"],
                    "obs": [round(float(v), 6) for v in obs],
                    "adv": [round(b.ret - keep, 6) for b in bs],
                    "final": [round(b.final, 6) for b in bs],
                }
            )
        a = net.act(obs) if net_state is not None else noop
        taken.append(int(a[lr_dim]))
        obs, _, term, trunc, info = env.step(a)
        steps += 1
        if term or trunc:
            break
    return {
        **job,
        "family": env.spec_task.family or env.spec_task.model,
        "final": float(info["val_norm_score"]),
        "states": states,
        "taken": taken,
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 3),
    }


# ----------------------------------------------------------------------------------
# The policy and its update
# ----------------------------------------------------------------------------------
def new_policy(
    obs_dim: int, nvec: tuple[int, ...], noop: tuple[int, ...], s: VineSettings, seed: int
) -> PolicyNet:
    """A policy that keeps everything: zero last layer, ``noop_bias`` on each "keep"."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = PolicyNet(obs_dim=obs_dim, nvec=nvec, hidden=tuple(s.hidden), activation="tanh")
    with torch.no_grad():
        net.action_net.weight.zero_()
        net.action_net.bias.zero_()
        off = 0
        for n, k in zip(nvec, noop, strict=True):
            net.action_net.bias[off + k] = s.noop_bias
            off += n
    return net


def restrict_to_support(net: PolicyNet, obs: np.ndarray, noop: tuple[int, ...]) -> None:
    """Make ``net`` act only within the budget fractions (feature 0) of ``obs``, the
    states it was fitted on, and keep (``noop``) elsewhere."""
    if len(obs):
        net.window = (float(obs[:, 0].min()), float(obs[:, 0].max()))
        net.hold = tuple(int(k) for k in noop)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def fit_member(
    episodes: list[dict[str, Any]],
    s: VineSettings,
    seed: int,
    member: int | None,
    obs_dim: int,
    nvec: tuple[int, ...],
    noop: tuple[int, ...],
    lr_dim: int,
) -> PolicyNet:
    """A one-round net fitted on ``episodes`` (all of them for ``member=None``, else a
    bootstrap resample of them under ``(seed, member)``): observation statistics,
    the update, and the support window when the recipe asks for it."""
    if member is not None:
        pick = np.random.default_rng([seed, member]).integers(len(episodes), size=len(episodes))
        episodes = [dict(episodes[i], index=j) for j, i in enumerate(pick)]
    obs, adv, w = labelled_states(episodes)
    net = new_policy(obs_dim, nvec, noop, s, seed)
    set_obs_norm(net, obs)
    update(net, obs, adv, w, lr_dim, int(noop[lr_dim]), s)
    if s.support_window:
        restrict_to_support(net, obs, noop)
    return net


def fit_consensus(
    episodes: list[dict[str, Any]],
    s: VineSettings,
    seed: int,
    obs_dim: int,
    nvec: tuple[int, ...],
    noop: tuple[int, ...],
    lr_dim: int,
) -> ConsensusNet:
    """``s.ensemble`` bootstrap members (:func:`fit_member`) as one consensus net. A
    member acts only within its own window, so the consensus's window is their
    intersection (where a member holds and another moves, the consensus holds)."""
    members = [
        fit_member(episodes, s, seed, j, obs_dim, nvec, noop, lr_dim) for j in range(s.ensemble)
    ]
    spans = [m.window for m in members if m.window is not None]
    window = None
    if spans:
        lo, hi = max(w[0] for w in spans), min(w[1] for w in spans)
        window = (lo, max(lo, hi))
    for m in members:
        m.window = m.hold = None
        m.eval()
    quorum = s.quorum if s.quorum and s.quorum != s.ensemble else None
    return ConsensusNet(members, hold=tuple(int(k) for k in noop), window=window, quorum=quorum)


def _net_from(arch: dict[str, Any], state: dict | None) -> PolicyNet | ConsensusNet:
    net = build_net(arch)
    if state is not None:
        net.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    net.eval()
    return net


def labelled_states(episodes: list[dict[str, Any]]) -> tuple[np.ndarray, ...]:
    """Observations, per-move advantages and importance weights of every branched
    state, in (round, episode) order whatever order they were collected in."""
    episodes = sorted(episodes, key=lambda ep: (ep["round"], ep["index"]))
    obs = [st["obs"] for ep in episodes for st in ep["states"]]
    adv = [st["adv"] for ep in episodes for st in ep["states"]]
    w = [ep["weight"] for ep in episodes for _ in ep["states"]]
    return (
        np.asarray(obs, dtype=np.float32),
        np.asarray(adv, dtype=np.float32),
        np.asarray(w, dtype=np.float32),
    )


def update(
    net: PolicyNet,
    obs: np.ndarray,
    adv: np.ndarray,
    weight: np.ndarray | None,
    lr_dim: int,
    keep: int,
    s: VineSettings,
) -> dict[str, float]:
    """One round's update of the lr head on the branched states (see the module doc),
    each state weighted by its episode's importance weight (None: all 1)."""
    if len(obs) == 0:
        return {"states": 0, "steps": 0, "kl": 0.0, "objective": 0.0}
    x = torch.as_tensor(obs)
    w = torch.ones(len(obs)) if weight is None else torch.as_tensor(weight, dtype=torch.float32)
    w = w / w.sum()
    a = torch.as_tensor(adv) - s.move_cost
    a[:, keep] = torch.as_tensor(adv)[:, keep]  # keep's own advantage is 0 by construction
    with torch.no_grad():
        old = torch.log_softmax(net.split_logits(net(x))[lr_dim], -1)
    opt = torch.optim.AdamW(net.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay)
    kl = torch.zeros(())
    steps = 0
    while steps < s.update_steps:  # full batch: nothing random, the same data gives the same net
        steps += 1
        logp = torch.log_softmax(net.split_logits(net(x))[lr_dim], -1)
        gain = ((logp.exp() * a).sum(-1) * w).sum()
        kl = ((old.exp() * (old - logp)).sum(-1) * w).sum()
        loss = -gain + s.kl_coef * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if kl.item() > s.kl_target:
            break
    with torch.no_grad():
        p = torch.softmax(net.split_logits(net(x))[lr_dim], -1)
        moves = float((p.argmax(-1) != keep).float().mean())
        gain = float(((p * a).sum(-1) * w).sum())
    return {
        "states": len(obs),
        "steps": steps,
        "kl": float(kl.detach()),
        "objective": gain,
        "share_moving": moves,
    }


def set_obs_norm(net: PolicyNet, obs: np.ndarray) -> None:
    """Normalise observations with the first round's statistics (kept in the policy)."""
    if len(obs) < 2:
        return
    with torch.no_grad():
        net.obs_mean.copy_(torch.as_tensor(obs.mean(0)))
        net.obs_std.copy_(torch.as_tensor(np.maximum(obs.std(0), 1e-3)))


# ----------------------------------------------------------------------------------
# The run: rounds of collect -> update, resumable
# ----------------------------------------------------------------------------------
def read_branches(path: Path) -> list[dict[str, Any]]:
    """The episodes of ``branches.jsonl``; a last line cut by a kill is dropped (and
    cut from the file, so the next append starts on a clean line)."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    good = raw[: raw.rfind(b"\n") + 1]
    if len(good) != len(raw):
        with path.open("r+b") as f:
            f.truncate(len(good))
    eps, seen = [], set()
    for line in good.decode().splitlines():
        ep = json.loads(line)
        key = (ep["round"], ep["index"])
        if key not in seen:  # a duplicate can only be a rerun of the same pure episode
            seen.add(key)
            eps.append(ep)
    return eps


def train_vine(
    settings: VineSettings,
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
    """Train; stop after ``rounds`` rounds or the round in which ``timesteps`` env steps
    (main runs and branches) were reached; save ``out/policy``."""
    from rlhpo.env import EnvConfig, HPOEnv
    from rlhpo.tracking import Tracker

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done_rounds, wall_before, resumes, state = 0, 0.0, 0, None
    if resume:
        tensors, meta = load_checkpoint(out)
        if meta.get("agent") != "vine":
            raise ValueError(f"{out}: checkpoint is for agent {meta.get('agent')!r}, not vine")
        settings = build_settings(VineSettings, meta["settings"])
        seed, suite = int(meta["seed"]), str(meta["suite"])
        done_rounds, wall_before = int(meta["rounds_done"]), float(meta["wall_time"])
        resumes = int(meta.get("resumes", 0)) + 1
        state = {k[7:]: v for k, v in tensors.items() if k.startswith("policy/")}
    s = settings
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    if set(s.freeze) != {"batch_size", "dropout"}:
        raise ValueError(
            f"vine moves the learning rate only: freeze must be [batch_size, "
            f"dropout], got {list(s.freeze)}"
        )
    config = EnvConfig.of(s.env_config(suite), timing=False).with_suite_loaded()
    probe = HPOEnv(config)
    tasks = list(probe.tasks)
    cur = Curriculum.build(
        tasks, s.lr_scale, s.uniform_share, load_curriculum(s.curriculum, tasks), s.unscaled_share
    )
    codec_nvec = tuple(int(n) for n in probe.action_space.nvec)
    noop = noop_of(probe.knobs)
    lr_dim = order_knobs(probe.knobs).index(LR.name)
    net: PolicyNet | ConsensusNet = new_policy(
        probe.observation_space.shape[0], codec_nvec, noop, s, seed
    )
    if state is not None and not (s.ensemble and done_rounds):
        net.load_state_dict(state)  # a consensus is refitted from its episodes below

    run_config = {
        "agent": "vine",
        "suite": suite,
        "seed": seed,
        "timesteps": timesteps,
        **settings_dict(s),
    }
    tracker = Tracker(
        out,
        config=run_config,
        use_wandb=use_wandb,
        group="train-vine",
        name=out.name,
        job_type="train",
    )
    t_start = time.monotonic()

    def wall() -> float:
        return wall_before + time.monotonic() - t_start

    def checkpoint(rounds_done: int) -> None:
        save_checkpoint(
            out,
            {f"policy/{k}": v for k, v in net.state_dict().items()},
            {
                "agent": "vine",
                "settings": settings_dict(s),
                "seed": seed,
                "suite": suite,
                "rounds_done": rounds_done,
                "wall_time": wall(),
                "resumes": resumes,
            },
        )

    path = out / BRANCHES
    try:
        if not resume:
            path.unlink(missing_ok=True)
            checkpoint(0)
        episodes = read_branches(path)
        total_steps = sum(ep["steps"] for ep in episodes)
        rnd = done_rounds
        if done_rounds and (s.support_window or s.ensemble):
            done = [ep for ep in episodes if ep["round"] <= done_rounds]
            if s.ensemble:  # deterministic: the same episodes give the same members
                net = fit_consensus(done, s, seed, net.obs_dim, codec_nvec, noop, lr_dim)
            else:  # the window of the checkpointed policy
                restrict_to_support(net, labelled_states(done)[0], noop)
        ex = ProcessPoolExecutor(s.workers) if s.workers > 1 else None
        try:
            while rnd < s.rounds and total_steps < timesteps:
                rnd += 1
                have = {ep["index"] for ep in episodes if ep["round"] == rnd}
                net_state = (
                    None if rnd == 1 else {k: v.numpy() for k, v in net.state_dict().items()}
                )
                arch = net.architecture()
                jobs = [
                    {"round": rnd, "index": i, **draw_episode(s, seed, rnd, i, cur)}
                    for i in range(s.episodes_per_round)
                    if i not in have
                ]
                if ex is None:
                    results = (collect_episode(config, s, j, net_state, arch) for j in jobs)
                else:
                    futs = [ex.submit(collect_episode, config, s, j, net_state, arch) for j in jobs]
                    results = (f.result() for f in futs)
                with path.open("a") as f:
                    for ep in results:
                        f.write(json.dumps(ep) + "\n")
                        f.flush()
                        os.fsync(f.fileno())
                        episodes.append(ep)
                        total_steps += ep["steps"]
                        tracker.log(
                            {
                                "timesteps": total_steps,
                                "round": rnd,
                                "agent/episode_final": ep["final"],
                                "agent/branched_states": len(ep["states"]),
                            }
                        )
                        if console is not None and show_progress:
                            n_round = sum(1 for e in episodes if e["round"] == rnd)
                            console.print(
                                f"round {rnd}: episode {n_round}/"
                                f"{s.episodes_per_round} ({ep['task']}, x"
                                f"{ep['lr_scale']:.2g}) {wall():.0f} s",
                                highlight=False,
                            )
                obs, adv, w = labelled_states(episodes)
                if s.ensemble:  # one round (validated): K bootstrap members, one consensus
                    net = fit_consensus(episodes, s, seed, net.obs_dim, codec_nvec, noop, lr_dim)
                    moving = (net.act(obs) != noop).any(-1).mean() if len(obs) else 0.0
                    stats = {
                        "states": len(obs),
                        "members": s.ensemble,
                        "share_moving": float(moving),
                    }
                else:
                    if rnd == 1:
                        set_obs_norm(net, obs)
                    stats = update(net, obs, adv, w, lr_dim, int(noop[lr_dim]), s)
                    if s.support_window:
                        restrict_to_support(net, obs, noop)
                tracker.log(
                    {
                        "timesteps": total_steps,
                        "round": rnd,
                        **{f"agent/{k}": v for k, v in stats.items()},
                    }
                )
                checkpoint(rnd)
        finally:
            if ex is not None:
                ex.shutdown()

        obs, adv, _ = labelled_states(episodes)
        best = adv.max(1) if len(adv) else np.zeros(0)
        info = {
            "suite": suite,
            "split": s.split,
            "tasks": list(s.tasks) or None,
            "agent": "vine",
            "timesteps": int(total_steps),
            "episodes": len(episodes),
            "rounds": rnd,
            "branched_states": int(len(obs)),
            "branches": int(adv.size),
            "share_states_with_a_better_move": float((best > s.move_cost).mean())
            if len(best)
            else None,
            "seed": seed,
            "train_wall_time_s": round(wall(), 1),
            "mean_return": float(np.mean([e["final"] for e in episodes])) if episodes else 0.0,
            "mean_over_episodes": len(episodes),
            "env": s.env_record(config),
            "freeze": list(s.freeze),
            "compute_charge": COMPUTE_NOTE,
            "resumes": resumes,
            "command": command,
            "recipe": settings_dict(s),
        }
        net.eval()
        save_policy(out / "policy", net, knobs=probe.knobs, obs_version=s.obs_version, **info)
        tracker.log_policy(out / "policy")
        tracker.summary(
            {
                "agent/episodes": len(episodes),
                "agent/timesteps": total_steps,
                "agent/train_wall_time_s": wall(),
            }
        )
        return info
    finally:
        tracker.finish()
