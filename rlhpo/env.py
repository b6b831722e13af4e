"""The tuning environment: each step trains a real model for one interval."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields, replace
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rlhpo.actions import ActionCodec
from rlhpo.knobs import BATCH_SIZE, LR, SearchSpace, check_knob
from rlhpo.observation import (
    MetricHistory,
    ObservationEncoder,
    encoder_class,
    normalised_score,
)
from rlhpo.residual import BaseSchedule
from rlhpo.safety import EXPLODE_FACTOR, CollapseRule, DivergenceRule
from rlhpo.starts import START_DRAWN, start_hp
from rlhpo.tasks.spec import Suite, TaskSpec, load_suite
from rlhpo.trainees import Trainee, build_trainee

ENV_ID = "rlhpo/HPO-v0"


@dataclass(frozen=True)
class EnvConfig:
    """Everything that configures an :class:`HPOEnv` (and every vector env of them,
    and the agents' env settings): one frozen value, validated once.

    Fields are the env's arguments (see :class:`HPOEnv`); lists become tuples.
    """

    suite: str | Suite = "default"
    split: str = "train"
    tasks: tuple[str, ...] | None = None
    budget_scale: float = 1.0
    compute_penalty: float = 0.1
    divergence_penalty: float = 0.5
    explode_factor: float = EXPLODE_FACTOR
    freeze: tuple[str, ...] = ()
    timing: bool = False
    lr_scale: tuple[float, float] = (1.0, 1.0)
    collapse_k: float | None = None
    rollback: bool = False
    lr_backoff: float = 0.25
    obs_version: int = 1
    base_schedule: BaseSchedule | str | dict | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("tasks", tuple(self.tasks) if self.tasks else None)
        put("freeze", tuple(self.freeze))
        for k in self.freeze:
            check_knob(k)
        if not self.budget_scale > 0:
            raise ValueError(f"budget_scale must be > 0, got {self.budget_scale!r}")
        put("budget_scale", float(self.budget_scale))
        for name in ("compute_penalty", "divergence_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
            put(name, float(v))
        DivergenceRule(self.explode_factor)  # checks it
        put("explode_factor", float(self.explode_factor))
        lr_scale = tuple(float(v) for v in self.lr_scale)
        if len(lr_scale) != 2 or not all(math.isfinite(v) and v > 0 for v in lr_scale):
            raise ValueError(f"lr_scale must be two finite numbers > 0, got {lr_scale!r}")
        if lr_scale[0] > lr_scale[1]:
            raise ValueError(f"lr_scale must be (low, high) with low <= high, got {lr_scale!r}")
        put("lr_scale", lr_scale)
        put("timing", bool(self.timing))
        if self.collapse_k is not None:
            CollapseRule(float(self.collapse_k))  # checks it
            put("collapse_k", float(self.collapse_k))
        if not isinstance(self.rollback, bool):
            raise ValueError(f"rollback must be true or false, got {self.rollback!r}")
        if not (isinstance(self.lr_backoff, (int, float)) and 0 < self.lr_backoff < 1):
            raise ValueError(f"lr_backoff must be in (0, 1), got {self.lr_backoff!r}")
        put("lr_backoff", float(self.lr_backoff))
        try:
            encoder_class(self.obs_version)
        except ValueError as e:
            raise ValueError(f"obs_version: {e}") from None
        suite_name = self.suite.name if isinstance(self.suite, Suite) else str(self.suite)
        put("base_schedule", BaseSchedule.of(self.base_schedule, suite_name))

    @classmethod
    def of(cls, config: Any = None, **overrides: Any) -> EnvConfig:
        """``config`` (default: the defaults) with ``overrides``; unknown names are an
        error. A suite (name, path or :class:`Suite`) in place of ``config`` is its
        ``suite`` field, as ``HPOEnv("default", split="test")`` reads."""
        if config is not None and not isinstance(config, EnvConfig):
            overrides = {"suite": config, **overrides}
            config = None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown env arguments {unknown}; known: {sorted(known)}")
        return replace(config, **overrides) if config is not None else cls(**overrides)

    def with_suite_loaded(self) -> EnvConfig:
        """The same config holding the loaded :class:`Suite` (shared by many envs)."""
        if isinstance(self.suite, Suite):
            return self
        return replace(self, suite=load_suite(self.suite))

    def kwargs(self) -> dict[str, Any]:
        """The fields as ``HPOEnv`` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class HPOEnv(gym.Env):
    """Tune learning rate, batch size and dropout of a training run while it trains.

    ## Description
    An episode is one training run of a task from a suite (``rlhpo/suites/*.toml``). The
    task's budget, counted in training samples, is cut into ``intervals`` equal
    parts; each step applies the action to the live run's hyperparameters, trains
    one interval, and evaluates on the validation split. The test split is never
    seen here.

    ## Action Space
    ``MultiDiscrete([5, 3, 3])`` decoded by :class:`rlhpo.actions.ActionCodec`:
    lr x{1/4, 1/2, 1, 2, 4}; batch size one step down / stay / up the space's
    list; dropout -0.1 / 0 / +0.1. Everything is clipped to the task's space.
    ``(2, 1, 1)`` keeps the hyperparameters as they are.

    ## Observation Space
    ``Box(-10, 10, (16,), float32)`` from :class:`rlhpo.observation.ObservationEncoder`:
    budget used, hyperparameters relative to their bounds, normalised validation
    score and its recent changes, loss ratios, train/val gap. With ``obs_version=2``,
    ``(21,)`` from :class:`rlhpo.observation.ObservationEncoderV2`.

    ## Rewards
    The change of the normalised validation score (0 = chance or mean predictor,
    1 = perfect) over the step, so an episode's return is final minus initial
    score and tasks of different difficulty are comparable. Minus a compute charge:
    ``compute_penalty * max(0, steps / static_steps - 1) / intervals``, where
    ``static_steps`` are the optimizer steps the task's default batch size would
    take for the same samples. Smaller batches buy more optimizer steps (and
    wall time) for the same samples; the charge makes the policy pay for that.

    ## Starting State
    A task drawn uniformly from the split (or ``options["task"]``); starting
    hyperparameters drawn from the task's start distribution (lr log-uniform,
    batch size from a list, dropout uniform), or ``options["hp"]``, or the task's
    default with ``options["start"] = "default"``. The untrained model is evaluated
    once to give the first observation.

    ## Episode End
    Terminated when the budget is used up, or on divergence
    (:class:`rlhpo.safety.DivergenceRule`: a non-finite loss, or a training or
    validation loss above ``explode_factor`` x the initial loss): then the
    score counts as chance (0) and ``divergence_penalty`` is subtracted. Never raises
    on divergence. With ``rollback`` a divergence does not end the episode: the run
    goes back to its last good state, as :class:`rlhpo.controller.Controller` does in
    a user's loop (see ``rollback`` below).

    ## Arguments
    An :class:`EnvConfig` (``config``), and/or its fields as keyword arguments:

    - ``suite``: suite name (``rlhpo/suites/NAME.toml``) or path to a TOML file (default ``"default"``).
    - ``split``: ``"train"``, ``"test"`` or ``"all"``.
    - ``tasks``: optional list of task names to restrict to.
    - ``budget_scale``: multiply every task's sample budget (tests, quick demos).
    - ``compute_penalty``: weight of the compute charge (default 0.1).
    - ``divergence_penalty``: subtracted on divergence (default 0.5).
    - ``explode_factor``: a train or val loss above this x initial loss is divergence (default 10).
    - ``freeze``: knobs the action may not change (ablations).
    - ``lr_scale``: ``(low, high)``; each episode draws a factor ``c`` log-uniformly
      from it and the run trains with ``c`` x the learning rate the policy sets (and
      sees). Domain randomisation: a task's best learning rate moves by ``c``, so a
      policy cannot memorise one schedule per task and has to read the run's response.
      ``(1, 1)`` (default) is off; the factor is in ``info["lr_scale"]``.
      ``reset(options={"lr_scale": c})`` pins it for one episode (a curriculum).
    - ``collapse_k``: off (None, default) or the ``k`` of a
      :class:`rlhpo.safety.CollapseRule`: when the validation score falls more than
      ``k`` x its noise below its best, the run goes back to its best state, the
      trained lr is capped at half the lr that produced it for the rest of the
      episode, the step's score is the restored one, and ``info["collapse"]`` says
      why. Needs runs that snapshot (every backend's do, the batched ones included).
    - ``rollback``: off (False, default) or on: what the
      :class:`~rlhpo.controller.Controller` does by default in a user's loop. On a
      divergence the run goes back to its last good interval's model, optimizer and
      knobs (the data order goes on), the lr becomes that interval's x
      ``lr_backoff`` (default 0.25; once more for each rollback in a row), the
      interval is not recorded (the observation is the last good one's), the reward
      is ``-divergence_penalty`` (less the compute charge), ``info["rollback"]`` says
      why, and the next step's action is not applied (the Controller makes no
      decision on a rollback). The episode ends only when the budget is spent.
    - ``obs_version``: the observation encoder, 1 (default; every shipped policy)
      or 2 (:class:`rlhpo.observation.ObservationEncoderV2`: lr relative to the
      start, plus the run's response since the last lr change and the training
      loss's slope and noise within the interval). Policies record it.
    - ``base_schedule``: off (None, default), or ``"warmup-cosine"`` (the peaks
      tuned on the suite's train split) or a :class:`rlhpo.residual.BaseSchedule`:
      residual control. The policy's lr is then a level that starts at the
      schedule's peak for the task's optimizer (the start's lr is replaced), and
      each interval trains at the level x the warm-up + cosine shape averaged over
      the interval (x ``lr_scale``'s factor), so "keep" reproduces the schedule.
    - ``timing``: add the run's training wall time (``wall_time``, seconds) to
      ``info``. Off by default so that ``info`` is deterministic under a seed;
      ``env.trainee.wall_time`` always has it.

    ## Version History
    - v0: first version (ObservationEncoder v1, ActionCodec v1). Since the safety
      rule was unified, a validation loss above ``explode_factor`` x the initial
      loss also counts as divergence; no committed episode or comparison run rose
      above 2.7x, so none of them changes, and the id stays v0. Spaces with opt-in
      knobs add action dimensions and observation features; the three-knob space
      is unchanged.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: Any = None, **kwargs: Any):
        cfg = EnvConfig.of(config, **kwargs)
        self.config = cfg
        self.suite = cfg.suite if isinstance(cfg.suite, Suite) else load_suite(cfg.suite)
        specs = self.suite.split(cfg.split)
        if cfg.tasks is not None:
            specs = [self.suite.task(t) for t in cfg.tasks]
        if not specs:
            raise ValueError(f"split {cfg.split!r} of suite {self.suite.name!r} holds no tasks")
        knob_sets = {s.space.names for s in specs}
        if len(knob_sets) != 1:
            raise ValueError(f"the env's tasks must tune the same knobs, got {sorted(knob_sets)}")
        self.knobs = knob_sets.pop()
        self.lr_scale = cfg.lr_scale
        self._lr_c = 1.0
        self.base: BaseSchedule | None = cfg.base_schedule
        self._level: float | None = None
        self.split = cfg.split
        self.tasks: dict[str, TaskSpec] = {
            s.name: (s.scaled(cfg.budget_scale) if cfg.budget_scale != 1.0 else s) for s in specs
        }
        self.task_names = list(self.tasks)
        self.budget_scale = cfg.budget_scale
        self.compute_penalty = cfg.compute_penalty
        self.divergence_penalty = cfg.divergence_penalty
        self.explode_factor = cfg.explode_factor
        self.guard = DivergenceRule(cfg.explode_factor)
        self.collapse = CollapseRule(cfg.collapse_k) if cfg.collapse_k is not None else None
        self._best: dict[str, Any] | None = None
        self._lr_cap: float | None = None
        self.rollback, self.lr_backoff = cfg.rollback, cfg.lr_backoff
        self._good: dict[str, Any] | None = None
        self._rollbacks, self._hold = 0, False
        self.freeze = cfg.freeze
        self.timing = cfg.timing
        self.encoder_cls = encoder_class(cfg.obs_version)
        codec = ActionCodec(specs[0].space, freeze=self.freeze)
        self.action_space = spaces.MultiDiscrete(np.array(codec.nvec, dtype=np.int64))
        self.observation_space = spaces.Box(
            low=-10.0,
            high=10.0,
            shape=(self.encoder_cls(specs[0].space).size,),
            dtype=np.float32,
        )
        self.encoder: ObservationEncoder | None = None
        self.codec: ActionCodec | None = None
        self.history = MetricHistory()
        self.n_classes = 0
        self.interval = 0
        self.static_steps = 0
        self._ref_loss = 0.0
        self.spec_task: TaskSpec | None = None
        self.space: SearchSpace | None = None  # the episode's space of the lr the policy sets
        self.trainee: Trainee | None = None

    # ------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        # Drawn first, so a given seed gives the same initialisation and data order
        # whatever the task and start options (baselines use run_seed_for(seed)).
        run_seed = int(self.np_random.integers(2**31 - 1))
        name = options.get("task")
        if name is None:
            name = self.task_names[int(self.np_random.integers(len(self.task_names)))]
        elif name not in self.tasks:
            raise ValueError(
                f"task {name!r} is not in this env's tasks: {', '.join(self.task_names)}"
            )
        task = self.tasks[name]
        start = self._start_hp(task, options)
        lo, hi = self.lr_scale
        if "lr_scale" in options:  # pinned by the caller (a curriculum, a regret grid)
            c = options["lr_scale"]
            if (
                isinstance(c, bool)
                or not isinstance(c, (int, float))
                or not (math.isfinite(c) and c > 0)
            ):
                raise ValueError(f"options['lr_scale'] must be a finite number > 0, got {c!r}")
            c = float(c)
        elif hi > lo:  # drawn only when on, so the default keeps every seed's episode
            c = float(math.exp(self.np_random.uniform(math.log(lo), math.log(hi))))
        else:
            c = lo
        self._lr_c = c
        # The lr the policy sets and sees is the trained one / c: its bounds are the
        # space's / c, so that every lr of the space stays reachable whatever c is.
        self.space = lr_scaled_space(task.space, c)
        if self.base is not None:  # the residual policy owns the lr: its level starts at the peak
            level = self.base.start_level(task.optimizer, start[LR.name])  # tuned, or user x f
            start = {**start, LR.name: self.space.clip(LR.name, level)}
        self._level = float(start[LR.name]) if self.base is not None else None
        self.spec_task = task
        lr = LR.name
        self.trainee = self._make_trainee(task, {**start, lr: start[lr] * c}, run_seed)
        self.encoder = self.encoder_cls(task.space)
        self.codec = ActionCodec(self.space, freeze=self.freeze)
        self.history = MetricHistory()
        self.n_classes = self.trainee.data.n_classes
        self.interval = 0
        self.static_steps = 0
        ev = self.trainee.evaluate()
        self._ref_loss = ev["loss"]
        self._best, self._lr_cap = None, None
        self._good, self._rollbacks, self._hold = None, 0, False
        for name, on in (("collapse_k", self.collapse is not None), ("rollback", self.rollback)):
            if on and not hasattr(self.trainee, "snapshot"):
                raise ValueError(
                    f"{name} needs runs that can be snapshotted; "
                    f"{type(self.trainee).__name__} has no snapshot()"
                )
        self.history.record(
            val_loss=ev["loss"],
            val_score=self._norm(ev["score"]),
            train_loss=None,
            hp=self.hp,
            budget_fraction=0.0,
        )
        self._keep_good(ev)
        return self.encoder.encode(self.history), self._info(ev, None, diverged=False)

    def _make_trainee(self, task: TaskSpec, hp: dict[str, Any], seed: int) -> Trainee:
        """A fresh run of ``task`` (the batched vector env hands out batched runs here)."""
        return build_trainee(task, hp, seed=seed)

    def _start_hp(self, task: TaskSpec, options: dict[str, Any]) -> dict[str, Any]:
        if "hp" in options:
            unknown = set(options["hp"]) - set(task.space.names)
            if unknown:
                raise ValueError(
                    f"options['hp'] has unknown knobs {sorted(unknown)}; "
                    f"knobs are {task.space.names}"
                )
            return task.space.clip_all({**task.default, **options["hp"]})
        start = options.get("start", START_DRAWN)
        if start == START_DRAWN:
            return task.space.draw(self.np_random, task.start.as_bounds())
        return start_hp(task, start)

    @property
    def hp(self) -> dict[str, Any]:
        """The run's hyperparameters as the policy sets and sees them (the learning
        rate before the episode's ``lr_scale`` factor)."""
        hp = dict(self.trainee.hp)
        if self._level is not None:
            hp[LR.name] = self._level
        elif self._lr_c != 1.0:
            hp[LR.name] = hp[LR.name] / self._lr_c
        return hp

    def _norm(self, score: float) -> float:
        return normalised_score(self.spec_task.metric, score, self.n_classes)

    def step(self, action):
        n = self._begin_step(action)
        stats = self.trainee.train(n)
        ev = self.trainee.evaluate()
        return self._end_step(stats, ev)

    # A step is split in two around the training work, so that the batched vector
    # env (rlhpo.vec_env) can train many envs' runs together in between and share
    # everything else (action decoding, reward, observation, info) with this class.
    def _begin_step(self, action) -> int:
        """Apply the action to the run; return the samples to train this interval."""
        if self.trainee is None:
            raise RuntimeError("call reset() before step()")
        task, tr = self.spec_task, self.trainee
        if self._hold:  # the interval after a rollback trains at the backed-off lr
            self._hold = False
            hp = self.hp
        else:
            hp = self.codec.decode(action, self.hp)
        if self._lr_cap is not None:  # after a collapse (the lr as the policy sees it)
            hp[LR.name] = min(hp[LR.name], self._lr_cap)
        n = min(task.interval_samples, task.budget_samples - tr.samples_seen)
        lr = hp[LR.name]
        if self.base is not None:
            self._level = float(hp[LR.name])
            lr = self.base.lr(lr, tr.samples_seen, n, task.budget_samples)
        tr.set_hp(**{**hp, LR.name: lr * self._lr_c})
        return n

    def _end_step(self, stats, ev: dict[str, float]):
        """Reward, observation and info after the interval was trained and evaluated."""
        task, tr = self.spec_task, self.trainee
        prev_score = self.history.last.val_score
        self.interval += 1
        static = math.ceil(stats.samples / task.default[BATCH_SIZE.name])
        self.static_steps += static
        reason = self.guard.check(
            self._ref_loss, stats.train_loss, ev["loss"], stopped=stats.diverged
        )
        diverged = reason is not None
        frac = tr.samples_seen / task.budget_samples
        charge = (
            self.compute_penalty * max(0.0, stats.steps / max(static, 1) - 1.0) / task.intervals
        )
        if diverged and self.rollback:
            return self._roll_back(reason, charge)
        if diverged:
            score = 0.0
            reward = (score - prev_score) - self.divergence_penalty - charge
        else:
            score = self._norm(ev["score"])
            reward = score - prev_score - charge
        collapse = None
        if self.collapse is not None and not diverged:
            collapse = self._watch_collapse(score, ev)
            if collapse is not None:
                score, ev = self._best["score"], dict(self._best["ev"])
                reward = score - prev_score - charge
        self.history.record(
            val_loss=ev["loss"] if math.isfinite(ev["loss"]) else 1e6,
            val_score=score,
            train_loss=stats.train_loss if math.isfinite(stats.train_loss) else 1e6,
            hp=self.hp,
            budget_fraction=frac,
            batch_losses=stats.batch_losses,
        )
        terminated = diverged or tr.samples_seen >= task.budget_samples
        if not diverged:
            self._keep_good(ev)
        obs = self.encoder.encode(self.history)
        info = self._info(ev, stats, diverged=diverged)
        info["compute_charge"] = charge
        if collapse is not None:
            info["collapse"] = collapse
        return obs, float(reward), bool(terminated), False, info

    def _keep_good(self, ev: dict[str, float]) -> None:
        """With ``rollback``: the state a divergence goes back to (the last good interval's)."""
        if self.rollback:
            self._rollbacks = 0
            best = self._best  # taken this interval: the same state (snapshots are never
            # modified in place), so the guard's copy serves both
            fresh = best is not None and best["interval"] == self.interval
            snap = best["snap"] if fresh else self.trainee.snapshot()
            self._good = {"snap": snap, "hp": self.hp, "ev": dict(ev)}

    def _roll_back(self, reason: str, charge: float):
        """A divergence with ``rollback``: back to the last good state at a lower lr,
        as the Controller does (:meth:`rlhpo.controller.Controller.step`)."""
        tr, task, good = self.trainee, self.spec_task, self._good
        tr.restore(good["snap"], data=False)
        self._rollbacks += 1
        lr = float(self.space.clip(LR.name, good["hp"][LR.name] * self.lr_backoff**self._rollbacks))
        if self._level is not None:  # info's lr_in_force: what the next interval trains at
            self._level = lr
            n = max(min(task.interval_samples, task.budget_samples - tr.samples_seen), 1)
            lr = self.base.lr(lr, tr.samples_seen, n, task.budget_samples)
        tr.set_hp(**{LR.name: lr * self._lr_c})
        self._hold = True
        ev = dict(good["ev"])
        obs = self.encoder.encode(self.history)
        info = self._info(ev, None, diverged=False)
        info["compute_charge"] = charge
        info["rollback"] = reason
        done = tr.samples_seen >= task.budget_samples
        return obs, float(-self.divergence_penalty - charge), bool(done), False, info

    def _watch_collapse(self, score: float, ev: dict[str, float]) -> str | None:
        """Keep the best state; on a collapse restore it and cap the lr. Returns why."""
        tr = self.trainee
        scores = [r.val_score for r in self.history.records] + [score]
        why = self.collapse.check(scores, int(tr.data.y_val.shape[0]), self.n_classes)
        if why is not None and self._best is not None:
            tr.restore(self._best["snap"], data=False)
            # Capped as the policy sees the lr (its level, or the lr before lr_scale).
            self._lr_cap = self._best["lr_at_best"] * self.collapse.lr_cap
            if self._level is not None:
                self._level = min(self._best["lr_at_best"], self._lr_cap)
            else:
                tr.set_hp(**{LR.name: min(tr.hp[LR.name], self._lr_cap * self._lr_c)})
            return why
        if self._best is None or score > self._best["score"]:
            self._best = {
                "snap": tr.snapshot(),
                "score": score,
                "lr_at_best": self.hp[LR.name],
                "ev": dict(ev),
                "interval": self.interval,
            }
        return None

    def _info(self, ev: dict[str, float], stats, diverged: bool) -> dict[str, Any]:
        tr, task = self.trainee, self.spec_task
        info = {
            "task": task.name,
            "interval": self.interval,
            "hp": self.hp,
            "val_loss": ev["loss"],
            "val_score": ev["score"],
            "val_norm_score": self.history.last.val_score,
            "train_loss": None if stats is None else stats.train_loss,
            "samples": tr.samples_seen,
            "budget_samples": task.budget_samples,
            "optimizer_steps": tr.optimizer_steps,
            "static_steps": self.static_steps,
            "diverged": diverged,
        }
        if self._lr_c != 1.0:
            info["lr_scale"] = self._lr_c
        if self.base is not None:  # hp["lr"] is the policy's level; this is what trains
            info["lr_in_force"] = float(tr.hp[LR.name])
        if self.timing:
            info["wall_time"] = tr.wall_time
        return info

    # -- going back: branch rollouts -----------------------------------------
    def save_state(self) -> dict[str, Any]:
        """Everything needed to continue this episode exactly from here: the run
        (model, optimizer, knobs, data order, dropout RNG, sample and step counters)
        and the env's own bookkeeping (history, level, guard state).

        :meth:`load_state` of it replays the same future for the same actions, so
        branches from one state share the data order and dropout masks (common random
        numbers): the difference of their returns is the difference their actions made.
        """
        if self.trainee is None:
            raise RuntimeError("call reset() before save_state()")
        tr = self.trainee
        return {
            "trainee": tr.snapshot(),
            "samples_seen": tr.samples_seen,
            "optimizer_steps": tr.optimizer_steps,
            "history": copy.deepcopy(self.history),
            "level": self._level,
            "lr_cap": self._lr_cap,
            "good": None if self._good is None else dict(self._good),
            "rollbacks": (self._rollbacks, self._hold),
            # The best snapshot is never modified in place (restore copies it).
            "best": None if self._best is None else dict(self._best),
            "interval": self.interval,
            "static_steps": self.static_steps,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Go back to a :meth:`save_state` of this episode (the same task and run)."""
        if self.trainee is None:
            raise RuntimeError("call reset() before load_state()")
        tr = self.trainee
        tr.restore(state["trainee"], data=True)
        tr.samples_seen = state["samples_seen"]
        tr.optimizer_steps = state["optimizer_steps"]
        self.history = copy.deepcopy(state["history"])
        self._level, self._lr_cap = state["level"], state["lr_cap"]
        self._best = None if state["best"] is None else dict(state["best"])
        self._good = None if state["good"] is None else dict(state["good"])
        self._rollbacks, self._hold = state["rollbacks"]
        self.interval, self.static_steps = state["interval"], state["static_steps"]
        # knobs: restore() wrote all but the lr, which the optimizer's state carries.

    def test_score(self) -> dict[str, float]:
        """Test-split loss and metric of the current run, for reporting only.

        Never part of the observation or reward.
        """
        if self.trainee is None:
            raise RuntimeError("call reset() before test_score()")
        return self.trainee.evaluate("test")


def lr_scaled_space(space: SearchSpace, c: float) -> SearchSpace:
    """``space`` with its lr bounds divided by ``c``: the bounds of the lr a policy sets
    in an episode whose runs train at ``c`` x that lr (``lr_scale``). Before this the
    policy's lr was clipped to the space itself, so at c = 1/4 a run whose level sat
    at the space's top (the SGD peak, 0.1) trained at a quarter of it and no move could
    raise it: the branch data of issue #22 scored every raise there 0."""
    if c == 1.0:
        return space
    lo, hi = space.bounds(LR.name)
    ok_lo, ok_hi = LR.limits  # what any space may hold: an extreme c stops at them

    def clamp(v: float) -> float:
        return min(max(v, ok_lo), ok_hi)

    bounds = {n: space.bounds(n) for n in space.names}
    return SearchSpace({**bounds, LR.name: (clamp(lo / c), clamp(hi / c))})


def run_seed_for(seed: int) -> int:
    """The training-run seed (model init, data order, dropout masks) that
    ``HPOEnv.reset(seed=seed)`` uses, so runs outside the env can match it."""
    from gymnasium.utils import seeding

    rng, _ = seeding.np_random(seed)
    return int(rng.integers(2**31 - 1))


def register_envs() -> None:
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="rlhpo.env:HPOEnv")
