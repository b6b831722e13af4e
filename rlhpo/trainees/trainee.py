"""A training run that can be advanced by an interval, evaluated, snapshotted and
restored, with learning rate, batch size and dropout changeable while it runs.

Works with any ``nn.Module`` and in-memory tensors. Batches are drawn from a
seeded permutation stream, so the batch size changes how many optimizer steps an
interval takes, never how many samples it sees.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlhpo.knobs import LR, LiveRun, SearchSpace

SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@dataclass
class IntervalStats:
    """What one call to :meth:`Trainee.train` did."""

    train_loss: float
    samples: int
    steps: int
    seconds: float
    diverged: bool
    # Each optimizer step's training loss, in order (what the observation's
    # within-interval slope and noise are computed from).
    batch_losses: tuple[float, ...] = ()


# Dropout masks come from the run's own torch generator, seeded with seed + this.
DROPOUT_SEED_OFFSET = 1


class SampleOrder:
    """A seeded stream of training-set indices: a fresh permutation every epoch.

    The data order of a run. The batch size only changes how the stream is cut
    into batches, never which samples come next.
    """

    def __init__(self, n: int, seed: int):
        self.n = int(n)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.perm = torch.randperm(self.n, generator=self.gen)
        self.cursor = 0

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` indices (continuing into the next epoch's permutation)."""
        parts = []
        while n > 0:
            if self.cursor >= len(self.perm):
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.cursor = 0
            take = min(n, len(self.perm) - self.cursor)
            parts.append(self.perm[self.cursor : self.cursor + take])
            self.cursor += take
            n -= take
        if not parts:
            return torch.empty(0, dtype=torch.long)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": self.perm, "cursor": self.cursor}

    def set_state(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.perm = state["perm"]
        self.cursor = state["cursor"]


def make_optimizer(
    name: str, params, lr: float, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """The task's optimizer; ``weight_decay=None`` keeps each one's usual default."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay or 0.0)
    if name == "adamw":
        wd = 0.01 if weight_decay is None else weight_decay
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay or 0.0)
    raise ValueError(f"optimizer must be one of adam, adamw, sgd; got {name!r}")


def score_of(metric: str, out: torch.Tensor, y: torch.Tensor) -> float:
    """Raw metric, higher is better: accuracy in [0, 1] or R^2."""
    if metric == "accuracy":
        # Classes on dim 1 for (batch, classes) and per-position (batch, classes, length)
        # logits alike; positions whose target is -100 (a prompt) are not scored.
        keep = y != -100
        return float(((out.argmax(1) == y) & keep).sum() / keep.sum().clamp(min=1))
    if metric == "r2":
        pred = out.squeeze(-1)
        ss_res = float(((pred - y) ** 2).sum())
        ss_tot = float(((y - y.mean()) ** 2).sum()) + 1e-12
        return 1.0 - ss_res / ss_tot
    raise ValueError(f"metric must be accuracy or r2, got {metric!r}")


class Trainee:
    """A live training run over in-memory tensors.

    Args:
        model: any module; its dropout modules are the dropout knob.
        data: train/val/test tensors (``rlhpo.tasks.datasets.TaskData`` or alike).
        metric: ``"accuracy"`` (cross-entropy loss) or ``"r2"`` (MSE loss).
        space: bounds every knob is clipped to.
        hp: starting value of every knob of the space (``lr``, ``batch_size``, ...).
        optimizer: ``adam``, ``adamw`` or ``sgd``.
        weight_decay: the optimizer's weight decay (None: AdamW 0.01, the others 0).
        seed: seeds data order and dropout masks (the model is built by the caller).
        scheduler: optional factory ``optimizer -> LR scheduler``, stepped every
            optimizer step; the lr knob moves its level, keeping its shape.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        *,
        metric: str,
        space: SearchSpace,
        hp: dict[str, Any],
        optimizer: str = "adam",
        seed: int = 0,
        scheduler: SchedulerFactory | None = None,
        weight_decay: float | None = None,
    ):
        self.model = model
        self.data = data
        self.metric = metric
        self.space = space
        hp = space.clip_all(hp)
        self.optimizer = make_optimizer(optimizer, model.parameters(), hp[LR.name], weight_decay)
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self.batch_size = 0
        self.live = LiveRun(
            self.optimizer, self.scheduler, model, self._get_batch_size, self._set_batch_size
        )
        # The optimizer was built with the lr (a scheduler may already have moved it).
        space.write(self.live, hp, skip=(LR.name,))
        self.loss_fn: Callable = nn.CrossEntropyLoss() if metric == "accuracy" else _mse
        self._order = SampleOrder(data.n_train, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) + DROPOUT_SEED_OFFSET)
            self._torch_state = torch.random.get_rng_state()
        self.samples_seen = 0
        self.optimizer_steps = 0
        self.wall_time = 0.0

    # -- knobs -------------------------------------------------------------
    def _get_batch_size(self) -> int:
        return self.batch_size

    def _set_batch_size(self, b: int) -> int:
        self.batch_size = int(b)
        return self.batch_size

    @property
    def hp(self) -> dict[str, Any]:
        return {k.name: k.read(self.live) for k in self.space.knobs}

    def set_hp(self, **values: Any) -> dict[str, Any]:
        """Apply knob values to the live run, clipped to the space. Returns the new hp."""
        self.space.write(self.live, values)
        return self.hp

    # -- training ----------------------------------------------------------
    def _next_indices(self, n: int) -> torch.Tensor:
        return self._order.take(n)

    def train(self, samples: int) -> IntervalStats:
        """Train on exactly ``samples`` samples (the last batch may be partial).

        Stops early and reports ``diverged`` on a non-finite loss.
        """
        t0 = time.perf_counter()
        outer_state = torch.random.get_rng_state()
        torch.random.set_rng_state(self._torch_state)
        self.model.train()
        x_all, y_all = self.data.x_train, self.data.y_train
        total, done, steps, diverged = 0.0, 0, 0, False
        losses: list[float] = []
        try:
            while done < samples:
                b = min(self.batch_size, samples - done)
                idx = self._next_indices(b)
                loss = self.loss_fn(self.model(x_all[idx]), y_all[idx])
                lv = loss.detach().item()
                done += b
                if not math.isfinite(lv):
                    diverged = True
                    break
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                steps += 1
                total += lv * b
                losses.append(lv)
        finally:
            self._torch_state = torch.random.get_rng_state()
            torch.random.set_rng_state(outer_state)
        dt = time.perf_counter() - t0
        self.samples_seen += done
        self.optimizer_steps += steps
        self.wall_time += dt
        mean = total / max(done, 1) if not diverged else float("nan")
        return IntervalStats(
            train_loss=mean,
            samples=done,
            steps=steps,
            seconds=dt,
            diverged=diverged,
            batch_losses=tuple(losses),
        )

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> dict[str, float]:
        """Loss and raw metric on ``val`` (default) or, only when asked, ``test``."""
        if split not in ("val", "test", "train"):
            raise ValueError(f"split must be val, test or train; got {split!r}")
        t0 = time.perf_counter()
        x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
        was_training = self.model.training
        self.model.eval()
        out = self.model(x)
        self.model.train(was_training)
        loss = float(self.loss_fn(out, y))
        score = score_of(self.metric, out, y) if torch.isfinite(out).all() else float("nan")
        self.wall_time += time.perf_counter() - t0
        return {"loss": loss, "score": score}

    # -- rollback ----------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly from here."""
        return copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "hp": self.hp,
                **self._order.state(),
                "torch_state": self._torch_state,
            }
        )

    def restore(self, snap: dict[str, Any], data: bool = True) -> None:
        """Go back to a snapshot. Sample/step/time counters keep counting (work was done).

        ``data=False`` restores the model, optimizer, scheduler and knobs only: the
        data order and random state go on from where they are, which is all a
        controller in a user's own loop can do (the env's collapse guard does this,
        so that env and :class:`rlhpo.controller.Controller` act alike)."""
        snap = copy.deepcopy(snap)
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if self.scheduler is not None and snap["scheduler"] is not None:
            self.scheduler.load_state_dict(snap["scheduler"])
        # The optimizer's state holds its knobs (lr, ...); the others are written back.
        self.space.write(self.live, snap["hp"], skip=(LR.name,))
        if data:
            self._order.set_state(snap)
            self._torch_state = snap["torch_state"]


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out.squeeze(-1), y)
