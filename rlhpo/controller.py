"""Apply a saved policy inside a training loop the user owns.

The user reports metrics once per interval; the :class:`Controller` records them
in a :class:`~rlhpo.observation.MetricHistory`, encodes them with the same
:class:`~rlhpo.observation.ObservationEncoder` as the environment, asks the policy
for an action, decodes it with the same :class:`~rlhpo.actions.ActionCodec`, and
applies the new learning rate (optimizer and LR scheduler), dropout (every dropout
module) and batch size (a batch sampler it provides, or a setter you give it).

Independently of the policy, a divergence (:class:`rlhpo.safety.DivergenceRule`:
a non-finite or exploding training or validation loss) rolls the run back to the
last good interval and lowers the learning rate. With ``collapse=True``
(:class:`rlhpo.safety.CollapseRule`), a validation score that falls far below its
best (measured in units of its own noise) restores the best state and caps the
learning rate at half the one that produced it.

    ctl = Controller.load("default", optimizer=opt, model=model,
                          budget_samples=30 * len(train_set), n_classes=10,
                          batch_size=64)  # or loader=your_loader: its batch size
    loader = ctl.loader(train_set)            # its batch size follows the policy
    ctl.start(val_loss=..., val_score=...)    # optional: the untrained model's evaluation
    ...
    decision = ctl.step(train_loss=..., val_loss=..., val_score=..., samples=seen)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rlhpo.actions import ActionCodec
from rlhpo.knobs import BATCH_SIZE, DROPOUT, LR, LiveRun, SearchSpace, get_learning_rate
from rlhpo.observation import (
    MetricHistory,
    ObservationEncoder,
    encoder_class,
    normalised_score,
)
from rlhpo.policy import Policy, load_policy
from rlhpo.safety import COLLAPSE_K, EXPLODE_FACTOR, CollapseRule, DivergenceRule

log = logging.getLogger("rlhpo.controller")

BatchSizeSetter = Callable[[int], "int | None"]


def default_space() -> SearchSpace:
    """The search space of the suite the shipped policies were trained on (default-v1)."""
    from rlhpo.tasks import load_suite

    suite = load_suite("default-v1")
    return suite.task(suite.train[0]).space


@dataclass
class Decision:
    """What the controller did at one interval boundary.

    ``hp`` holds the hyperparameters in force from now on (log them; for a residual
    policy the lr in force, its level times the schedule). ``action`` is
    the policy's raw action (None when the policy was not asked: budget spent, or
    a rollback). ``rolled_back`` says the safety net restored the last good state.
    """

    hp: dict[str, Any]
    interval: int
    observation: np.ndarray | None = None
    action: np.ndarray | None = None
    rolled_back: bool = False
    done: bool = False
    events: tuple[str, ...] = ()

    @property
    def lr(self) -> float:
        return float(self.hp[LR.name])

    @property
    def batch_size(self) -> int:
        return int(self.hp[BATCH_SIZE.name])

    @property
    def dropout(self) -> float:
        return float(self.hp[DROPOUT.name])

    def as_log(self, prefix: str = "hp/") -> dict[str, float]:
        """Flat numbers for a logger: ``hp/lr``, ``hp/batch_size``, ``hp/dropout`` (and
        any other knob), ``hp/rollback``."""
        out = {f"{prefix}{k}": float(v) for k, v in self.hp.items()}
        out[f"{prefix}rollback"] = float(self.rolled_back)
        return out


class _RunState:
    """The last good state of the live run: model parameters and buffers, optimizer
    state and hyperparameters, scheduler state.

    Taken at every good interval, so it must be cheap: tensors are copied into
    buffers kept from the previous snapshot (one ``torch._foreach_copy_``), which
    was measured 4-5x faster than copying ``state_dict()``s; new buffers are
    allocated only when the set of tensors changes (e.g. Adam's state appears at
    its first step).
    """

    def __init__(self) -> None:
        self.hp: dict[str, Any] = {}
        self.interval = 0
        self.restorable: list[str] = []
        self._model: list[torch.Tensor] = []
        self._opt_keys: list[tuple[int, str]] = []
        self._opt: list[torch.Tensor] = []
        self._opt_other: dict[tuple[int, str], Any] = {}
        self._groups: list[dict[str, Any]] = []
        self._sched: dict[str, Any] | None = None

    def save(self, ctl: Controller) -> None:
        self.hp, self.interval, self.restorable = dict(ctl.hp), ctl.interval, []
        if ctl.model is not None:
            self._model = _copy_into(self._model, _model_tensors(ctl.model))
            self.restorable.append("model")
        opt = ctl.optimizer
        if opt is not None:
            keys, live, other = [], [], {}
            for i, p in enumerate(_params(opt)):
                for k, v in opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        keys.append((i, k))
                        live.append(v)
                    else:
                        other[(i, k)] = copy.deepcopy(v)
            if keys != self._opt_keys:
                self._opt = []
            self._opt_keys, self._opt_other = keys, other
            self._opt = _copy_into(self._opt, live)
            # Group values are numbers, flags and tuples (copy.copy keeps them); a
            # tensor lr (capturable optimizers) is cloned.
            self._groups = [
                {
                    k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.copy(v)
                    for k, v in g.items()
                    if k != "params"
                }
                for g in opt.param_groups
            ]
            self.restorable.append("optimizer")
        sched = ctl.scheduler
        if sched is not None and hasattr(sched, "state_dict"):
            self._sched = copy.deepcopy(sched.state_dict())
            self.restorable.append("scheduler")

    def restore(self, ctl: Controller) -> list[str]:
        """Put the run back into this state; returns what was restored."""
        done = []
        if "model" in self.restorable and ctl.model is not None:
            _copy_tensors(_model_tensors(ctl.model), self._model)
            done.append("model")
        opt = ctl.optimizer
        if "optimizer" in self.restorable and opt is not None:
            params = _params(opt)
            state: dict[torch.Tensor, dict[str, Any]] = {}
            # Clones, so that the saved state survives the optimizer's next steps.
            for (i, k), v in zip(self._opt_keys, self._opt, strict=True):
                state.setdefault(params[i], {})[k] = v.clone()
            for (i, k), v in self._opt_other.items():
                state.setdefault(params[i], {})[k] = copy.deepcopy(v)
            opt.state.clear()
            opt.state.update(state)
            for g, saved in zip(opt.param_groups, self._groups, strict=True):
                g.update(copy.deepcopy(saved))
            done.append("optimizer")
        if "scheduler" in self.restorable and ctl.scheduler is not None:
            ctl.scheduler.load_state_dict(copy.deepcopy(self._sched))
            done.append("scheduler")
        return done


def _model_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def _params(optimizer: Any) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _copy_into(buffers: list[torch.Tensor], live: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copy ``live`` tensors into ``buffers`` (new ones if shapes or dtypes differ)."""
    same = len(buffers) == len(live) and all(
        b.shape == t.shape and b.dtype == t.dtype and b.device == t.device
        for b, t in zip(buffers, live, strict=True)
    )
    if not same:
        with torch.no_grad():
            return [t.detach().clone() for t in live]
    _copy_tensors(buffers, live)
    return buffers


def _copy_tensors(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    with torch.no_grad():
        if not dst:
            return
        if hasattr(torch, "_foreach_copy_"):  # one fused call; a loop where it is missing
            torch._foreach_copy_(dst, [t.detach() for t in src])
        else:
            for d, t in zip(dst, src, strict=True):
                d.copy_(t)


class Controller:
    """Drives the hyperparameters of a run the user owns with a saved policy.

    Args:
        policy: a loaded :class:`~rlhpo.policy.Policy` (see :meth:`load`).
        optimizer: the run's optimizer; its learning rate is the lr knob.
        model: the run's model; its dropout modules are the dropout knob.
        budget_samples: training samples the whole run will use (the policy sees
            the fraction used so far).
        space: bounds of the knobs (default: the default suite's space, which
            shipped policies were trained on).
        metric: ``"accuracy"`` or ``"r2"``; ``val_score`` is the raw metric.
        n_classes: number of classes (accuracy only: chance-normalises the score).
        scheduler: the run's LR scheduler, if any: an lr change scales its base
            values so that it survives the scheduler's next step.
        batch_size: the starting batch size (clipped to the space). Required
            unless ``loader`` is given.
        loader: the run's ``DataLoader``: its batch size is the starting one.
        set_batch_size: optional ``f(batch_size) -> applied batch size or None``
            for runs whose batches the controller's own loader does not draw.
        deterministic: take the policy's most likely action (default) or sample.
        freeze: knobs the policy may not change (default: the policy file's).
        rollback: keep a copy of model and optimizer state at each good interval
            and go back to it on divergence (off saves memory on large models).
        explode_factor: a training or validation loss above this x the reference
            loss (the first evaluation's loss) counts as divergence, as in the env.
        lr_backoff: the learning rate is multiplied by this after a rollback.
        collapse: the do-no-harm guard: ``True`` for the default
            :class:`~rlhpo.safety.CollapseRule` (``k`` as the policy was trained with),
            a rule, or ``False``. Default (None): as the policy file says (its
            ``guard``; on for files that do not say).
            When the validation score falls well below its best (in units of its
            noise), the best state is restored and the lr capped; logged as an event.
        n_val: validation samples behind ``val_score`` (scales the collapse
            rule's noise; without it the spread seen so far is used).
        obs_version: the observation encoder the policy must have been trained with
            (default: the one its manifest names); a mismatch is an error.
        optimizer_kind: ``"adam"`` or ``"sgd"``: which tuned peak a residual policy
            (one trained over a base schedule, see :mod:`rlhpo.residual`) starts
            from. Default: read from ``optimizer``'s class (``SGD`` is sgd, anything
            else adam).
        base_peak: ``"tuned"`` or ``"user"``: where a residual policy's level starts,
            at the tuned peak or at the run's starting lr x ``peak_factor`` (for
            fine-tuning, where the user's lr carries information; see
            :class:`~rlhpo.residual.BaseSchedule`). Default: as the policy file says.
        peak_factor: with ``base_peak="user"``, the factor on the user's lr (default 1).
        interval_samples: samples of the next interval (a residual policy averages
            its schedule over it). Default: the last interval's, or 1/20 of the
            budget before the first.
        apply: False computes decisions without changing anything (for measuring).
        seed: seeds action sampling when ``deterministic`` is False.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        model: nn.Module | None = None,
        budget_samples: int,
        space: SearchSpace | None = None,
        metric: str = "accuracy",
        n_classes: int = 0,
        scheduler: Any | None = None,
        batch_size: int | None = None,
        loader: Any | None = None,
        set_batch_size: BatchSizeSetter | None = None,
        deterministic: bool = True,
        freeze: Iterable[str] | None = None,
        rollback: bool = True,
        explode_factor: float = EXPLODE_FACTOR,
        lr_backoff: float = 0.25,
        collapse: bool | CollapseRule | None = None,
        n_val: int | None = None,
        obs_version: int | None = None,
        optimizer_kind: str | None = None,
        base_peak: str | None = None,
        peak_factor: float | None = None,
        interval_samples: int | None = None,
        apply: bool = True,
        seed: int = 0,
    ):
        if not isinstance(policy, Policy):
            raise TypeError(
                f"policy must be an rlhpo.policy.Policy (use Controller.load(dir)), got {type(policy).__name__}"
            )
        if isinstance(budget_samples, bool) or not isinstance(budget_samples, (int, np.integer)):
            raise ValueError(f"budget_samples must be a positive int, got {budget_samples!r}")
        if budget_samples <= 0:
            raise ValueError(f"budget_samples must be a positive int, got {budget_samples!r}")
        if metric not in ("accuracy", "r2"):
            raise ValueError(f"metric must be accuracy or r2, got {metric!r}")
        if metric == "accuracy" and (not isinstance(n_classes, (int, np.integer)) or n_classes < 2):
            raise ValueError(
                f"metric 'accuracy' needs n_classes >= 2 (to normalise the score), got {n_classes!r}"
            )
        self.guard = DivergenceRule(explode_factor)
        if collapse is None:
            collapse = policy.guard
        if collapse is True:
            collapse = CollapseRule(policy.collapse_k or COLLAPSE_K)
        self.collapse: CollapseRule | None = collapse or None
        self.n_val = n_val
        if batch_size is None and loader is not None:
            batch_size = _loader_batch_size(loader)
        if batch_size is None:
            raise ValueError(
                "Controller needs the run's starting batch_size (or its loader=), got neither"
            )
        if not (0 < lr_backoff < 1):
            raise ValueError(f"lr_backoff must be in (0, 1), got {lr_backoff!r}")
        self.policy = policy
        self.optimizer = optimizer
        self.model = model
        self.scheduler = scheduler
        self.budget_samples = int(budget_samples)
        self.space = space if space is not None else default_space()
        self.metric = metric
        self.n_classes = int(n_classes)
        self.freeze = tuple(policy.freeze if freeze is None else freeze)
        # The very objects the environment uses: one encoder, one codec, over the
        # knobs the policy was trained with.
        self.knobs = policy.knobs
        missing = [k for k in self.knobs if k not in self.space.names]
        if missing:
            raise ValueError(
                f"the policy tunes {', '.join(missing)}, which the space "
                f"({', '.join(self.space.names)}) does not have"
            )
        knob_space = SearchSpace({k: self.space.bounds(k) for k in self.knobs})
        self.space = knob_space
        if obs_version is not None and obs_version != policy.obs_version:
            raise ValueError(
                f"obs_version={obs_version!r} needs a policy trained with observation "
                f"encoder v{obs_version}; this policy was trained with v{policy.obs_version}"
            )
        self.encoder: ObservationEncoder = encoder_class(policy.obs_version)(knob_space)
        self.base = policy.base_schedule
        if base_peak is not None or peak_factor is not None:
            if self.base is None:
                raise ValueError(
                    "base_peak/peak_factor need a policy trained over a base schedule; "
                    "this policy has none"
                )
            self.base = self.base.with_peak(base_peak, peak_factor)
        if optimizer_kind is None:
            optimizer_kind = type(optimizer).__name__ if optimizer is not None else "adam"
        elif str(optimizer_kind).lower() not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer_kind must be adam, adamw or sgd, got {optimizer_kind!r}")
        self.optimizer_kind = optimizer_kind
        if interval_samples is not None and (
            isinstance(interval_samples, bool)
            or not isinstance(interval_samples, (int, np.integer))
            or interval_samples < 1
        ):
            raise ValueError(f"interval_samples must be a positive int, got {interval_samples!r}")
        self.interval_samples = None if interval_samples is None else int(interval_samples)
        self._last_interval = 0
        self._batch_losses: list[float] = []
        self.codec = ActionCodec(knob_space, freeze=self.freeze)
        self.deterministic = bool(deterministic)
        self.rollback = bool(rollback)
        self.explode_factor = self.guard.explode_factor
        self.lr_backoff = float(lr_backoff)
        self.apply = bool(apply)
        self._set_batch_size = set_batch_size
        self._live = LiveRun(optimizer, scheduler, model, None, set_batch_size)
        self._warned_lr_clip = False
        self._generator = torch.Generator().manual_seed(int(seed))
        self.history = MetricHistory()
        self.events: list[str] = []
        self.interval = 0
        self.samples = 0
        self._ref_loss: float | None = None
        self._started = False
        self.done = False
        live = self.space.read(LiveRun(optimizer, scheduler, model, lambda: int(batch_size)))
        hp = {
            k.name: live.get(k.name, k.lowest(self.space.bounds(k.name))) for k in knob_space.knobs
        }
        if self.base is not None:  # a residual policy owns the lr: its level starts at the peak
            hp[LR.name] = self.base.start_level(self.optimizer_kind, hp[LR.name])
        clipped = self.space.clip_all(hp)
        if clipped != hp and self.base is None:
            log.warning(
                "rlhpo controller: starting hyperparameters %s clipped to the policy's space %s",
                hp,
                clipped,
            )
            self._warned_lr_clip = True
        self.hp: dict[str, Any] = {}
        self._apply_hp(clipped)
        self._good = _RunState()
        self._best = _RunState()
        self._best_score = -math.inf
        self._best_record = None
        self._lr_cap: float | None = None
        self._snapshot()

    # -- construction ----------------------------------------------------
    @classmethod
    def load(cls, policy_dir: str | os.PathLike[str], **kwargs: Any) -> Controller:
        """Load a policy directory (safetensors + manifest) and build a controller on it.

        The global torch RNG is left as it was (building the network draws an
        initialisation that the loaded weights then replace).
        """
        with torch.random.fork_rng(devices=[]):
            policy = load_policy(policy_dir)
        return cls(policy, **kwargs)

    @classmethod
    def for_trainee(
        cls, policy: Policy, trainee: Any, budget_samples: int, **kwargs: Any
    ) -> Controller:
        """A controller wired to an :class:`rlhpo.trainees.Trainee` (what ``rlhpo apply`` runs)."""

        def set_bs(b: int) -> int:
            trainee.batch_size = int(b)
            return trainee.batch_size

        kwargs.setdefault("metric", trainee.metric)
        kwargs.setdefault("space", trainee.space)
        kwargs.setdefault("n_classes", trainee.data.n_classes)
        kwargs.setdefault("n_val", int(trainee.data.y_val.shape[0]))
        return cls(
            policy,
            optimizer=trainee.optimizer,
            model=trainee.model,
            scheduler=trainee.scheduler,
            budget_samples=budget_samples,
            batch_size=trainee.batch_size,
            set_batch_size=set_bs,
            **kwargs,
        )

    # -- batches -----------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.hp[BATCH_SIZE.name])

    def batch_sampler(
        self, data: int | Sized, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> ControlledBatchSampler:
        """A batch sampler over ``data`` (a dataset or its length) whose batch size
        is this controller's at the moment each batch is drawn."""
        n = data if isinstance(data, int) else len(data)
        return ControlledBatchSampler(self, n, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def loader(
        self, dataset: Any, shuffle: bool = True, seed: int = 0, **loader_kwargs: Any
    ) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` whose batch size follows the controller.

        With ``num_workers > 0`` the loader draws a few batches ahead, so a new
        batch size takes effect that many batches later.
        """
        for bad in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if bad in loader_kwargs:
                raise ValueError(
                    f"loader() sets {bad!r} itself (the batch size follows the controller); got {bad}={loader_kwargs[bad]!r}"
                )
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=self.batch_sampler(dataset, shuffle, seed), **loader_kwargs
        )

    # -- the protocol ------------------------------------------------------
    def start(self, *, val_loss: float, val_score: float) -> Decision:
        """Record the untrained model's evaluation and apply the policy's first decision.

        Optional, but the environment starts this way, so with it the policy's
        observations match what it saw in training exactly.
        """
        if self._started or self.history.records:
            raise RuntimeError("start() must come first and only once")
        self._started = True
        self._refresh_lr()
        self._ref_loss = float(val_loss) if math.isfinite(val_loss) else None
        self.history.record(
            val_loss=val_loss,
            val_score=self._norm(val_score),
            train_loss=None,
            hp=self.hp,
            budget_fraction=min(self.samples / self.budget_samples, 1.0),
        )
        return self._decide()

    def step(
        self,
        *,
        train_loss: float | None,
        val_loss: float,
        val_score: float,
        samples: int,
        batch_losses: Sequence[float] | None = None,
    ) -> Decision:
        """Report the interval just trained and get the hyperparameters for the next one.

        Args:
            train_loss: mean training loss over the interval (None if unknown).
            val_loss: validation loss now.
            val_score: the raw validation metric now (accuracy in [0, 1], or R^2).
            samples: training samples processed since the start of the run (cumulative).
            batch_losses: the interval's per-batch training losses, in order (v2
                policies read their trend and noise). Default: those reported with
                :meth:`observe_loss` since the last step, if any.
        """
        if self.done:
            raise RuntimeError(
                f"the budget of {self.budget_samples} samples is spent (samples={self.samples}); "
                "the run is over"
            )
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)):
            raise ValueError(f"samples must be a cumulative int count, got {samples!r}")
        if samples < self.samples:
            raise ValueError(
                f"samples is cumulative and cannot go down: got {samples} after {self.samples}"
            )
        self._last_interval = int(samples) - self.samples
        self.samples = int(samples)
        self.interval += 1
        if batch_losses is None and self._batch_losses:
            batch_losses = self._batch_losses
        self._batch_losses = []
        self._refresh_lr()
        reason = self.guard.check(self._ref_loss, train_loss, val_loss)
        if reason is not None:
            return self._roll_back(reason)
        if self._ref_loss is None:
            # No start(): the first report is the reference, as the env's first evaluation is.
            self._ref_loss = float(val_loss)
        self.history.record(
            val_loss=val_loss,
            val_score=self._norm(val_score),
            train_loss=train_loss,
            hp=self.hp,
            budget_fraction=min(self.samples / self.budget_samples, 1.0),
            batch_losses=batch_losses,
        )
        if self.collapse is not None:
            scores = [r.val_score for r in self.history.records]
            why = self.collapse.check(scores, self.n_val, self.n_classes)
            if why is not None and self._best_score > -math.inf:
                return self._restore_best(why)
        self._snapshot()
        if self.samples >= self.budget_samples:
            self.done = True
            obs = self.encoder.encode(self.history)
            return Decision(self._hp_in_force(), self.interval, observation=obs, done=True)
        return self._decide()

    def observe_loss(self, loss: float | torch.Tensor) -> None:
        """Report one batch's training loss (a float or a 0-d tensor); :meth:`step`
        uses the interval's losses for the within-interval slope and noise."""
        self._batch_losses.append(float(loss))

    @property
    def observation(self) -> np.ndarray:
        """The observation the policy would see now."""
        return self.encoder.encode(self.history)

    # -- internals ---------------------------------------------------------
    def _hp_in_force(self) -> dict[str, Any]:
        """The hyperparameters the run trains with now (a residual policy's lr is its
        level x the schedule's shape; ``self.hp`` holds the level the policy sees)."""
        hp = dict(self.hp)
        if self.base is not None:
            hp[LR.name] = self.lr_in_force
        return hp

    def _norm(self, raw: float) -> float:
        return normalised_score(self.metric, raw, self.n_classes)

    def _decide(self) -> Decision:
        obs = self.encoder.encode(self.history)
        action = self.policy.net.act(
            obs, deterministic=self.deterministic, generator=self._generator
        )
        new = self.codec.decode(action, self.hp)
        if self._lr_cap is not None:
            new[LR.name] = min(new[LR.name], self._lr_cap)
        if self.apply:
            self._apply_hp(new)
        return Decision(self._hp_in_force(), self.interval, observation=obs, action=action)

    def _apply_hp(self, hp: dict[str, Any], force: tuple[str, ...] = ()) -> None:
        """Write ``hp`` into the run; frozen knobs are never written (only ``force``d
        ones: the safety net's lr back-off)."""
        skip = [k for k in self.freeze if k not in force]
        if self.base is not None:
            # Residual: the policy's lr is a level; the run trains at level x the
            # schedule's shape over the next interval (rlhpo.residual).
            level = float(self.space.clip(LR.name, hp[LR.name]))
            nxt = self.interval_samples or self._last_interval or max(self.budget_samples // 20, 1)
            lr = self.base.lr(level, self.samples, nxt, self.budget_samples)
            written = (
                self.space.write(self._live, {**hp, LR.name: lr}, skip=skip) if self.apply else {}
            )
            self.hp = {k: written.get(k, hp[k]) for k in self.knobs}
            self.hp[LR.name] = level
            self.lr_in_force = float(written.get(LR.name, lr))
            return
        written = self.space.write(self._live, hp, skip=skip) if self.apply else {}
        self.hp = {k: written.get(k, hp[k]) for k in self.knobs}
        self.lr_in_force = float(self.hp[LR.name])

    def _refresh_lr(self) -> None:
        # A scheduler moves the lr between decisions; the policy sees the lr in force,
        # as the environment's trainee reports it. A residual policy sees its level.
        if self.optimizer is not None and self.apply and self.base is None:
            live = get_learning_rate(self.optimizer)
            clipped = float(self.space.clip(LR.name, live))
            if clipped != live and not self._warned_lr_clip:
                self._warned_lr_clip = True
                log.warning(
                    "rlhpo controller: the run's lr %.3g lies outside the policy's space "
                    "%s; the policy sees %.3g (warned once)",
                    live,
                    self.space.describe(LR.name),
                    clipped,
                )
            self.hp[LR.name] = clipped

    def _snapshot(self) -> None:
        self._rollbacks_in_a_row = 0
        if self.rollback:  # also with apply=False: it only reads, and costs what it costs
            self._good.save(self)
        else:  # nothing to restore; the hyperparameters still fall back
            self._good.hp, self._good.interval = dict(self.hp), self.interval
        score = self.history.last.val_score if self.history.records else -math.inf
        if self.collapse is not None and score > self._best_score:
            self._best_score = score
            self._best_record = self.history.last if self.history.records else None
            if self.rollback:
                self._best.save(self)
            else:
                self._best.hp, self._best.interval = dict(self.hp), self.interval

    def _restore_best(self, reason: str) -> Decision:
        """Collapse: back to the best state, lr capped at ``lr_cap`` x its lr."""
        best = self._best
        restored = best.restore(self) if self.apply else []
        self._lr_cap = float(best.hp[LR.name]) * self.collapse.lr_cap
        new_lr = float(self.space.clip(LR.name, min(best.hp[LR.name], self._lr_cap)))
        self._apply_hp({**best.hp, LR.name: new_lr}, force=(LR.name,))
        # The best state is the last good one now, and the history goes on from it.
        if self.rollback:
            self._good.save(self)
        # As in the env (one rule, one behaviour): the interval counts with the
        # restored state's evaluation, and the policy decides from there under the cap.
        last = self.history.records.pop()
        rec = self._best_record
        self.history.records.append(
            dataclasses.replace(
                last,
                val_loss=rec.val_loss if rec is not None else last.val_loss,
                val_score=self._best_score,
                hp=dict(self.hp),
            )
        )
        msg = (
            f"rlhpo controller: collapse at interval {self.interval} ({reason}); restored "
            f"{', '.join(restored) or 'nothing'} of interval {best.interval}; lr capped at "
            f"{self._lr_cap:.3g}"
        )
        log.warning(msg)
        self.events.append(msg)
        self.done = self.samples >= self.budget_samples
        if self.done:
            obs = self.encoder.encode(self.history)
            return Decision(
                self._hp_in_force(),
                self.interval,
                observation=obs,
                rolled_back=True,
                done=True,
                events=(msg,),
            )
        d = self._decide()
        return dataclasses.replace(d, rolled_back=True, events=(msg,))

    def _roll_back(self, reason: str) -> Decision:
        good = self._good
        restored = good.restore(self) if self.apply else []
        # Relative to the restored state's lr, once more for each rollback in a row.
        self._rollbacks_in_a_row += 1
        old_lr = self.hp[LR.name]
        new_lr = float(
            self.space.clip(LR.name, good.hp[LR.name] * self.lr_backoff**self._rollbacks_in_a_row)
        )
        self._apply_hp({**good.hp, LR.name: new_lr}, force=(LR.name,))
        what = (
            f"restored {', '.join(restored)} of interval {good.interval}"
            if restored
            else "nothing to restore (no model/optimizer given or rollback off)"
        )
        msg = (
            f"rlhpo controller: divergence at interval {self.interval} ({reason}); {what}; "
            f"lr {old_lr:.3g} -> {new_lr:.3g}"
        )
        log.warning(msg)
        self.events.append(msg)
        self.done = self.samples >= self.budget_samples
        return Decision(
            self._hp_in_force(), self.interval, rolled_back=True, done=self.done, events=(msg,)
        )


def _loader_batch_size(loader: Any) -> int | None:
    """The batch size a ``DataLoader`` draws (its own or its batch sampler's)."""
    b = getattr(loader, "batch_size", None)
    if b is None:
        b = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(b) if b is not None else None


class ControlledBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields index batches of the controller's current batch size.

    Each pass is a seeded permutation (or ``0..n-1``); the batch size is read when
    each batch is formed, so a change applies from the next batch on.
    """

    def __init__(
        self,
        controller: Controller,
        n: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if n <= 0:
            raise ValueError(f"the dataset must hold at least one sample, got n={n}")
        self.controller, self.n, self.shuffle, self.drop_last = (
            controller,
            int(n),
            shuffle,
            drop_last,
        )
        self._gen = torch.Generator().manual_seed(int(seed))

    def __iter__(self) -> Iterator[list[int]]:
        order = (
            torch.randperm(self.n, generator=self._gen) if self.shuffle else torch.arange(self.n)
        )
        i = 0
        while i < self.n:
            b = self.controller.batch_size
            idx = order[i : i + b]
            i += b
            if self.drop_last and len(idx) < b:
                return
            yield idx.tolist()

    def __len__(self) -> int:
        """Batches per pass at the current batch size (changes when it changes)."""
        b = self.controller.batch_size
        return self.n // b if self.drop_last else math.ceil(self.n / b)
