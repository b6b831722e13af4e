"""The batched backend: many runs of one task trained together in one process.

A :class:`BatchedTrainee` holds any number of independent runs of one task
(:class:`BatchedRun`, each with the :class:`~rlhpo.trainees.Trainee` interface:
``hp``, ``set_hp``, ``train``, ``evaluate``, counters). Each run has its own
initialisation (built by :func:`rlhpo.trainees.init_model` under its seed,
exactly as ``build_trainee`` builds it), learning rate, batch size, dropout,
data order (the same :class:`~rlhpo.trainees.SampleOrder` stream as a Trainee
with that seed) and optimizer state.

How runs are trained together (:meth:`BatchedTrainee.train`):

- Runs that train the same number of samples at the same batch size form a
  group; a group advances in lockstep, one optimizer step of every run per
  step, each step one batched matrix multiply per layer over stacked weights
  (:mod:`rlhpo.trainees.stacked`). So every run's step sees exactly the rows
  the unbatched Trainee's step would see, with no padding and no masking: the
  batch size is honoured exactly and samples are counted per run. Different
  batch sizes cost one more group (a few more kernel launches), not wasted
  rows; padding to the largest batch wasted up to 2x the work with the random
  batch sizes a policy visits, and gradient accumulation changes the float
  summation order of every step.
- Groups are cut into chunks of at most ``chunk_elements`` elements in their
  widest layer output, so that a chunk's working set stays near the CPU's L2
  cache: measured, a [32, 64, 128] elementwise op took 15x the time of a
  [8, 64, 128] one on this machine.
- Adam/AdamW: ``torch._fused_adam_`` per run (per-run learning rate, weight
  decay, beta1 and step count, one fused pass over its tensors), or with
  ``exact=True`` the single-tensor arithmetic of ``torch.optim.Adam`` applied to
  the stacked tensors. SGD with momentum: the stacked update. Weight decay is
  the task's (``TaskSpec.weight_decay``, else each optimizer's default) or the
  run's ``weight_decay`` knob; momentum (SGD's, Adam's beta1) 0.9 or the run's
  ``momentum`` knob; both with ``torch.optim``'s semantics (Adam and SGD add
  ``weight_decay * w`` to the gradient, AdamW decays the weights).
- Dropout: with ``exact=True`` each run draws its masks from its own torch
  generator, exactly as ``nn.Dropout`` does inside the Trainee (same seed, same
  shapes, same order), so a batched run reproduces the unbatched one up to
  float summation order. By default each run draws from its own fast numpy
  ``SFC64`` stream: 16-bit uniforms compared with ``1 - p`` (keep probability
  within 2**-16 of ``1 - p``), scaled by ``1 / (1 - p)`` as ``nn.Dropout`` does.
  Same distribution, different masks: runs then agree with the unbatched ones
  statistically, not sample by sample.

Going back (:meth:`BatchedRun.snapshot`, :meth:`BatchedRun.restore`,
:meth:`BatchedRun.fork`): a run's snapshot holds what a Trainee's does (weights,
optimizer state with Adam's moments and step count, knobs, data order, dropout
stream), as copies that nothing mutates. A fork adds ``k`` runs to the group
that continue from the run's current state with the same data order and dropout
stream (common random numbers); only their knobs then set them apart. One
exception: the ``torch.func`` backend's fast dropout draws masks from one
stream per group, so its forks and restores see other masks (same
distribution); with ``exact=True`` every run has its own stream there too. A
group caps the bytes its live snapshots hold (``snapshot_cap_bytes``):
a request past it is a :class:`SnapshotMemoryError`, not an out-of-memory crash.

Supported: ``mlp`` and ``cnn1d`` tasks (:func:`supports_stacked`). Other
families are batched by the subclass :class:`rlhpo.trainees.functional.FunctionalTrainee`
(``torch.func``); :func:`supports_batching` covers both.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rlhpo.knobs import DROPOUT, KNOBS
from rlhpo.tasks.models import build_model
from rlhpo.tasks.spec import TaskSpec
from rlhpo.trainees import init_model, task_data
from rlhpo.trainees.stacked import StackedNet, loss_and_grad
from rlhpo.trainees.trainee import (
    DROPOUT_SEED_OFFSET,
    IntervalStats,
    SampleOrder,
    _mse,
    score_of,
)

Tensor = torch.Tensor

BATCHED_MODELS = ("mlp", "cnn1d")
BATCHED_OPTIMIZERS = ("adam", "adamw", "sgd")
# The knobs this backend's own optimizer and dropout implement; a space with any
# other knob trains one model per env.
BATCHED_KNOBS = (*KNOBS, "weight_decay", "momentum")
# Elements of a chunk's widest layer output (1 MiB of float32). Smaller chunks keep
# the working set in L2 but pay per-op overhead on fewer models; measured best
# among 64K..4M on the MNIST-1D MLP and CNN (experiments/throughput.py --chunks).
CHUNK_ELEMENTS = 262144
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_ADAMW_DECAY = 0.01  # as rlhpo.trainees.trainee.make_optimizer
_SGD_MOMENTUM = 0.9
# Bytes of live snapshots one group may hold. The env's collapse guard holds one or
# two per run (the best state, and the next one while it replaces it): two of each of
# 32 runs of the largest default-suite model (resmlp, 1.7 MiB) take 107 MiB
# (experiments/results/branch_cost.md).
SNAPSHOT_CAP_BYTES = 1 << 30


class SnapshotMemoryError(ValueError):
    """A snapshot would take a group's live snapshots past its ``snapshot_cap_bytes``."""


@dataclass(frozen=True, eq=False)
class RunSnapshot:
    """Everything a :class:`BatchedRun` needs to continue exactly from a point.

    Its tensors are copies that nothing writes to (restore and fork copy out of
    them), so deep-copying a snapshot returns it unchanged.
    """

    group: BatchedTrainee
    params: tuple[Tensor, ...]
    state: tuple[Tensor, ...]
    state2: tuple[Tensor, ...]
    step: int
    # Every knob of the space, plus weight decay and momentum where no knob sets them.
    settings: dict[str, Any]
    diverged: bool
    order: dict[str, Any]
    dropout_rng: Any
    nbytes: int

    def __deepcopy__(self, memo: dict) -> RunSnapshot:
        return self


def _tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _rng_state(rng: Any) -> Any:
    """A copy of a run's dropout stream state (torch generator or numpy bit generator)."""
    return rng.get_state() if isinstance(rng, torch.Generator) else rng.state


def _set_rng_state(rng: Any, state: Any) -> None:
    if isinstance(rng, torch.Generator):
        rng.set_state(state)
    else:
        rng.state = state


def _rng_from(rng: Any, state: Any) -> Any:
    """A new dropout stream of ``rng``'s kind, at ``state``."""
    new = torch.Generator() if isinstance(rng, torch.Generator) else type(rng)()
    _set_rng_state(new, state)
    return new


def batchable_optimizer(spec: TaskSpec) -> bool:
    """Whether the batched optimizer implements ``spec``'s optimizer and knobs."""
    return spec.optimizer in BATCHED_OPTIMIZERS and set(spec.space.names) <= set(BATCHED_KNOBS)


def task_decay(spec: TaskSpec) -> float:
    """The weight decay a Trainee of ``spec`` starts with (``make_optimizer``'s rule)."""
    if spec.weight_decay is not None:
        return float(spec.weight_decay)
    return _ADAMW_DECAY if spec.optimizer == "adamw" else 0.0


def supports_stacked(spec: TaskSpec) -> bool:
    """Whether runs of ``spec`` can be trained by the stacked :class:`BatchedTrainee`."""
    return spec.model in BATCHED_MODELS and batchable_optimizer(spec)


def supports_batching(spec: TaskSpec) -> bool:
    """Whether runs of ``spec`` can be trained by a batched backend (stacked, or
    ``torch.func`` for other families)."""
    if supports_stacked(spec):
        return True
    from rlhpo.trainees.functional import supports_functional  # it subclasses ours

    return supports_functional(spec)


class BatchedRun:
    """One run inside a :class:`BatchedTrainee`, with the Trainee interface.

    ``train`` and ``evaluate`` on a single run work (a group of one); the speed
    comes from :meth:`BatchedTrainee.train` on many runs at once.
    """

    def __init__(self, group: BatchedTrainee, hp: dict[str, Any], seed: int):
        self.group = group
        self.seed = int(seed)
        spec = group.spec
        hp = spec.space.clip_all({**spec.default, **hp})
        model = init_model(spec, group.data, hp[DROPOUT.name], seed)
        self.params = group.net.params_of(model)
        self.state = [torch.zeros_like(p) for p in self.params]  # exp_avg / momentum
        self.state2 = [torch.zeros_like(p) for p in self.params] if group.optimizer != "sgd" else []
        self.step = 0
        # The optimizer's settings when the space has no knob for them (a knob's
        # value replaces them below, as Trainee's space.write does).
        self.weight_decay = task_decay(spec)
        self.momentum = _SGD_MOMENTUM if group.optimizer == "sgd" else _ADAM_BETAS[0]
        # One attribute per knob (lr, batch_size, dropout, ...): the chunk optimizer
        # and the dropout masks read them.
        for k, v in hp.items():
            setattr(self, k, v)
        self.order = SampleOrder(group.data.n_train, seed)
        if group.exact:
            self.dropout_rng: Any = torch.Generator().manual_seed(self.seed + DROPOUT_SEED_OFFSET)
        else:
            self.dropout_rng = np.random.SFC64(np.random.SeedSequence([self.seed, 1]))
        # Counters, plain attributes: they keep counting across restore, and callers
        # that save and restore a whole episode write them back.
        self.samples_seen = 0
        self.optimizer_steps = 0
        self.wall_time = 0.0
        self.released = False
        # Whether the last interval stopped on a non-finite loss (forks are refused).
        self.diverged = False

    # -- the Trainee interface ----------------------------------------------
    @property
    def data(self):
        return self.group.data

    @property
    def space(self):
        return self.group.spec.space

    @property
    def metric(self) -> str:
        return self.group.spec.metric

    @property
    def hp(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.space.names}

    def set_hp(self, **values: Any) -> dict[str, Any]:
        """Apply knob values, clipped to the space (as ``Trainee.set_hp``)."""
        for k, v in values.items():
            setattr(self, k, self.space.clip(k, v))
        return self.hp

    def train(self, samples: int) -> IntervalStats:
        return self.group.train([(self, samples)])[0]

    def evaluate(self, split: str = "val") -> dict[str, float]:
        return self.group.evaluate([self], split)[0]

    def to_module(self) -> nn.Module:
        """A plain ``nn.Module`` holding this run's current weights."""
        g = self.group
        model = build_model(g.spec.model, g.spec.model_args, g.data, dropout=self.dropout)
        return g.net.load_into(model, self.params)

    def release(self) -> None:
        """Leave the group (its memory is freed with the last reference)."""
        self.released = True
        self.group.runs.discard(self)

    def state_bytes(self) -> int:
        """Bytes of this run's weights and optimizer state."""
        return _tensor_bytes(self.params + self.state + self.state2)

    # -- going back ---------------------------------------------------------
    def snapshot_bytes(self) -> int:
        """Bytes a :meth:`snapshot` of this run takes (weights, optimizer state, data
        order and dropout stream state)."""
        order = self.order.state()
        rng = _rng_state(self.dropout_rng)
        rng_bytes = _tensor_bytes([rng]) if isinstance(rng, Tensor) else 64
        return self.state_bytes() + _tensor_bytes([order["gen"], order["perm"]]) + rng_bytes

    def snapshot(self) -> RunSnapshot:
        """Everything needed to continue this run exactly from here (as
        ``Trainee.snapshot``). Counts against the group's ``snapshot_cap_bytes``
        while it is alive; past the cap, a :class:`SnapshotMemoryError`."""
        self.group._check([self])
        nbytes = self.snapshot_bytes()
        self.group._reserve(nbytes)
        order = self.order.state()
        settings = {"weight_decay": self.weight_decay, "momentum": self.momentum, **self.hp}
        snap = RunSnapshot(
            group=self.group,
            params=tuple(p.clone() for p in self.params),
            state=tuple(t.clone() for t in self.state),
            state2=tuple(t.clone() for t in self.state2),
            step=self.step,
            settings=settings,
            diverged=self.diverged,
            # perm is replaced at each epoch, never written in place: no copy needed.
            order=order,
            dropout_rng=_rng_state(self.dropout_rng),
            nbytes=nbytes,
        )
        weakref.finalize(snap, self.group._free, nbytes)
        return snap

    def restore(self, snap: RunSnapshot, data: bool = True) -> None:
        """Go back to ``snap`` (a snapshot of a run of this group), as
        ``Trainee.restore``: weights, optimizer state and knobs; with ``data`` also the
        data order and dropout stream. Sample/step/time counters keep counting."""
        self.group._check([self])
        if not isinstance(snap, RunSnapshot):
            raise ValueError(
                f"restore needs a RunSnapshot from BatchedRun.snapshot, got {type(snap).__name__}"
            )
        if snap.group is not self.group:
            raise ValueError("snapshot was taken in another BatchedTrainee")
        for dst, src in (
            (self.params, snap.params),
            (self.state, snap.state),
            (self.state2, snap.state2),
        ):
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)
        self.step = snap.step
        for k, v in snap.settings.items():
            setattr(self, k, v)
        self.diverged = snap.diverged
        if data:
            self.order.set_state(snap.order)
            _set_rng_state(self.dropout_rng, snap.dropout_rng)

    def fork(self, k: int) -> list[BatchedRun]:
        """``k`` new runs in this group that continue from this run's current state:
        same weights, optimizer state, knobs, counters, data order and dropout stream.
        Refused for a diverged run."""
        return self.group.fork(self, k)

    def _copy(self) -> BatchedRun:
        new = object.__new__(BatchedRun)
        new.__dict__.update(self.__dict__)
        new.params = [p.clone() for p in self.params]
        new.state = [t.clone() for t in self.state]
        new.state2 = [t.clone() for t in self.state2]
        new.order = SampleOrder(self.order.n, 0)
        new.order.set_state(self.order.state())
        new.dropout_rng = _rng_from(self.dropout_rng, _rng_state(self.dropout_rng))
        return new


class BatchedTrainee:
    """Runs of one task, trained together (see the module docstring).

    Args:
        spec: the task (``supports_batching(spec)`` must hold).
        exact: replay the Trainee's dropout masks and Adam arithmetic (slower;
            for checking the batched backend against the unbatched one).
        chunk_elements: activation elements per chunk (cache-sized work units).
        snapshot_cap_bytes: most bytes the group's live snapshots may hold (None: no cap).
    """

    def __init__(
        self,
        spec: TaskSpec,
        exact: bool = False,
        chunk_elements: int = CHUNK_ELEMENTS,
        snapshot_cap_bytes: int | None = SNAPSHOT_CAP_BYTES,
    ):
        if not self.supports(spec):
            raise ValueError(
                f"task {spec.name!r} cannot be batched by {type(self).__name__}: model "
                f"{spec.model!r} with optimizer {spec.optimizer!r} (see supports_batching; "
                f"optimizers {BATCHED_OPTIMIZERS})"
            )
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        check_snapshot_cap(snapshot_cap_bytes)
        self.snapshot_cap_bytes = snapshot_cap_bytes
        self.live_snapshot_bytes = 0  # held by this group's live snapshots
        self.spec = spec
        self.exact = bool(exact)
        self.chunk_elements = int(chunk_elements)
        self.optimizer = spec.optimizer
        self.data = task_data(spec)
        template = init_model(spec, self.data, 0.0, 0)
        self.net = self.build_net(template)
        self.loss_fn = nn.CrossEntropyLoss() if spec.metric == "accuracy" else _mse
        self.runs: set[BatchedRun] = set()
        self._fused = (
            not self.exact
            and self.optimizer in ("adam", "adamw")
            and hasattr(torch, "_fused_adam_")
            and hasattr(torch, "_fused_adamw_")
        )

    @classmethod
    def supports(cls, spec: TaskSpec) -> bool:
        """Whether this backend trains runs of ``spec``."""
        return supports_stacked(spec)

    def build_net(self, template: nn.Module) -> Any:
        """The network all runs share (weights are per run)."""
        return StackedNet.for_model(template, self.data.input_shape)

    def add(self, hp: dict[str, Any] | None = None, seed: int = 0) -> BatchedRun:
        """A new run: hyperparameters ``hp`` (the task default for missing knobs,
        clipped to the space), initialised and ordered by ``seed``."""
        if hp:
            unknown = set(hp) - set(self.spec.space.names)
            if unknown:
                raise ValueError(
                    f"unknown knobs {sorted(unknown)}; knobs are {self.spec.space.names}"
                )
        run = BatchedRun(self, dict(hp or {}), seed)
        self.runs.add(run)
        return run

    def fork(self, run: BatchedRun, k: int) -> list[BatchedRun]:
        """``k`` new runs that continue from ``run``'s current state (see
        :meth:`BatchedRun.fork`); give them different knobs with ``set_hp``."""
        self._check([run])
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"fork k must be an int >= 1, got {k!r}")
        if run.diverged:
            raise ValueError("cannot fork a diverged run: its last interval reported diverged")
        if not all(bool(torch.isfinite(p).all()) for p in run.params):
            raise ValueError("cannot fork a diverged run: its weights hold non-finite values")
        forks = [run._copy() for _ in range(k)]
        self.runs.update(forks)
        return forks

    def _reserve(self, nbytes: int) -> None:
        cap = self.snapshot_cap_bytes
        if cap is not None and self.live_snapshot_bytes + nbytes > cap:
            raise SnapshotMemoryError(
                f"a snapshot of {nbytes} bytes would take this group's snapshots to "
                f"{self.live_snapshot_bytes + nbytes} bytes, past snapshot_cap_bytes={cap} "
                f"(task {self.spec.name!r}; release snapshots or raise the cap)"
            )
        self.live_snapshot_bytes += nbytes

    def _free(self, nbytes: int) -> None:
        self.live_snapshot_bytes -= nbytes

    def _check(self, runs: Iterable[BatchedRun]) -> None:
        for r in runs:
            if r.group is not self:
                raise ValueError("run belongs to another BatchedTrainee")
            if r.released:
                raise ValueError("run was released from its BatchedTrainee")

    def loss_and_grad(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Each run's mean loss ``[k]`` on its batch and its gradient w.r.t. ``out``."""
        return loss_and_grad(self.spec.metric, out, y, self.exact)

    def chunk_size(self, rows: int) -> int:
        """Runs per chunk when each run processes ``rows`` samples at once."""
        return max(1, self.chunk_elements // max(1, rows * self.net.widest))

    # -- training -----------------------------------------------------------
    def train(self, requests: Sequence[tuple[BatchedRun, int]]) -> list[IntervalStats]:
        """Train each ``(run, samples)`` on exactly that many samples (the last
        batch may be partial), all runs together. Returns their stats, in order.

        A run whose loss turns non-finite stops there and reports ``diverged``,
        as a Trainee does; the others go on.
        """
        self._check(r for r, _ in requests)
        if len({id(r) for r, _ in requests}) != len(requests):
            raise ValueError("a run appears twice in one train() call")
        results: dict[int, IntervalStats] = {}
        groups: dict[tuple[int, int], list[BatchedRun]] = defaultdict(list)
        for run, n in requests:
            n = int(n)
            if n <= 0:
                results[id(run)] = IntervalStats(0.0, 0, 0, 0.0, False)
            else:
                groups[(run.batch_size, n)].append(run)
        for (bs, n), runs in groups.items():
            size = self.chunk_size(bs)
            for i in range(0, len(runs), size):
                chunk = runs[i : i + size]
                for run, st in zip(chunk, self._train_chunk(chunk, bs, n), strict=True):
                    results[id(run)] = st
        return [results[id(r)] for r, _ in requests]

    def _train_chunk(self, runs: list[BatchedRun], bs: int, n: int) -> list[IntervalStats]:
        t0 = time.perf_counter()
        k = len(runs)
        data = self.data
        order_states = [r.order.state() for r in runs]
        idx = torch.stack([r.order.take(n) for r in runs])  # [k, n]
        P = [torch.stack(ps) for ps in zip(*(r.params for r in runs), strict=True)]
        S = [torch.stack(ps) for ps in zip(*(r.state for r in runs), strict=True)]
        S2 = [torch.stack(ps) for ps in zip(*(r.state2 for r in runs), strict=True)]
        G = [torch.empty_like(p) for p in P]
        opt = _ChunkOptimizer(self, runs, P, G, S, S2)
        masks = _DropoutMasks(self, runs)
        # The chunk's whole interval of samples, gathered once: [k, n, ...].
        flat = idx.view(-1)
        xs = data.x_train.index_select(0, flat).view(k, n, *data.x_train.shape[1:])
        ys = data.y_train.index_select(0, flat).view(k, n, *data.y_train.shape[1:])
        done = [0] * k
        steps = [0] * k
        total = torch.zeros(k, dtype=torch.float64)
        # Each step's per-run losses; a run's own steps are the first steps[j] rows
        # (a run only ever drops out).
        step_losses: list[torch.Tensor] = []
        alive = list(range(k))
        for t in range(math.ceil(n / bs)):
            lo = t * bs
            b = min(bs, n - lo)
            ctx: list = []
            x = xs[:, lo : lo + b].contiguous()
            out = self.net.forward(P, x, masks.draw(b, alive), ctx)
            loss, dout = self.loss_and_grad(out, ys[:, lo : lo + b])
            for i in alive:
                done[i] += b
            if not bool(torch.isfinite(loss).all()):
                finite = torch.isfinite(loss).tolist()
                bad = [i for i in alive if not finite[i]]
                alive = [i for i in alive if finite[i]]
                # Their data order stops where a Trainee's would (the rest of this
                # interval's draws were never used).
                for i in bad:
                    runs[i].order.set_state(order_states[i])
                    runs[i].order.take(done[i])
                if not alive:
                    break
            self.net.backward(P, G, dout, ctx)
            opt.step(alive)
            if len(alive) == k:
                total += loss.double() * b
            else:
                good = torch.tensor(alive)
                total[good] += loss[good].double() * b
            for i in alive:
                steps[i] += 1
            step_losses.append(loss.detach().double())
        opt.finish()
        per_step = torch.stack(step_losses).T.tolist() if step_losses else [[] for _ in runs]
        for j, r in enumerate(runs):
            for dst, src in ((r.params, P), (r.state, S), (r.state2, S2)):
                for d, s in zip(dst, src, strict=True):
                    d.copy_(s[j])
        dt = (time.perf_counter() - t0) / k  # wall time shared equally by the chunk
        stats = []
        alive_set = set(alive)
        for j, r in enumerate(runs):
            diverged = j not in alive_set
            r.diverged = diverged
            r.samples_seen += done[j]
            r.optimizer_steps += steps[j]
            r.wall_time += dt
            mean = float(total[j]) / max(done[j], 1) if not diverged else float("nan")
            losses = tuple(per_step[j][: steps[j]])
            stats.append(IntervalStats(mean, done[j], steps[j], dt, diverged, losses))
        return stats

    # -- evaluation ---------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, runs: Sequence[BatchedRun], split: str = "val") -> list[dict[str, float]]:
        """Loss and raw metric of each run on ``val`` (default) or, only when asked,
        ``test``, as ``Trainee.evaluate`` computes them (dropout off)."""
        if split not in ("val", "test", "train"):
            raise ValueError(f"split must be val, test or train; got {split!r}")
        runs = list(runs)
        self._check(runs)
        x, y = getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")
        out: list[dict[str, float]] = []
        size = self.chunk_size(int(x.shape[0]))
        for i in range(0, len(runs), size):
            t0 = time.perf_counter()
            chunk = runs[i : i + size]
            P = [torch.stack(ps) for ps in zip(*(r.params for r in chunk), strict=True)]
            o = self.net.forward(P, x, shared=True)
            for j in range(len(chunk)):
                oj = o[j]
                loss = float(self.loss_fn(oj, y))
                score = score_of(self.spec.metric, oj, y) if torch.isfinite(oj).all() else math.nan
                out.append({"loss": loss, "score": score})
            dt = (time.perf_counter() - t0) / len(chunk)
            for r in chunk:
                r.wall_time += dt
        return out


def check_snapshot_cap(cap: Any) -> None:
    """A ``snapshot_cap_bytes`` must be None or an int >= 0."""
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
        raise ValueError(f"snapshot_cap_bytes must be None or an int >= 0, got {cap!r}")


class _ChunkOptimizer:
    """The optimizer step of a chunk of runs over their stacked tensors."""

    def __init__(self, group: BatchedTrainee, runs, P, G, S, S2):
        self.group, self.runs, self.P, self.G, self.S, self.S2 = group, runs, P, G, S, S2
        self.kind = group.optimizer
        k = len(runs)
        self.lr = [r.lr for r in runs]
        self.decay = [float(r.weight_decay) for r in runs]
        self.momentum = [float(r.momentum) for r in runs]
        self.steps = [r.step for r in runs]
        if group._fused:
            # Per-run views, and a step counter per run that the fused kernel reads
            # for every tensor (it reads it, torch.optim increments it before).
            self.views = [
                ([p[i] for p in P], [g[i] for g in G], [s[i] for s in S], [s[i] for s in S2])
                for i in range(k)
            ]
            self.step_t = [torch.tensor(float(r.step)) for r in runs]

    def step(self, alive: list[int]) -> None:
        if self.group._fused:
            fused = torch._fused_adamw_ if self.kind == "adamw" else torch._fused_adam_
            for i in alive:
                p, g, m, v = self.views[i]
                self.step_t[i] += 1
                fused(
                    p,
                    g,
                    m,
                    v,
                    [],
                    [self.step_t[i]] * len(p),
                    lr=self.lr[i],
                    beta1=self.momentum[i],
                    beta2=_ADAM_BETAS[1],
                    weight_decay=self.decay[i],
                    eps=_ADAM_EPS,
                    amsgrad=False,
                    maximize=False,
                )
            for i in alive:
                self.steps[i] += 1
            return
        k = len(self.runs)
        everyone = len(alive) == k
        sel = None if everyone else torch.tensor(alive)
        for i in alive:
            self.steps[i] += 1
        if self.kind == "sgd":
            self._sgd(alive, sel)
        else:
            self._adam(alive, sel)

    def _pick(self, t: Tensor, sel: Tensor | None) -> Tensor:
        return t if sel is None else t.index_select(0, sel)

    def _put(self, t: Tensor, sel: Tensor | None, val: Tensor) -> None:
        if sel is not None:
            t.index_copy_(0, sel, val)

    def _adam(self, alive: list[int], sel: Tensor | None) -> None:
        # torch.optim.Adam's single-tensor arithmetic, with per-run lr, weight decay,
        # beta1 and step count as [k, 1, ...] tensors: same operations, same rounding.
        b2 = _ADAM_BETAS[1]
        b1 = [self.momentum[i] for i in alive]
        wd = [self.decay[i] for i in alive]
        step_size, bc2_sqrt, decay = [], [], []
        for i in alive:
            s = self.steps[i]
            step_size.append(-(self.lr[i] / (1 - self.momentum[i] ** s)))
            bc2_sqrt.append((1 - b2**s) ** 0.5)
            decay.append(1 - self.lr[i] * self.decay[i])
        same_b1 = all(b == b1[0] for b in b1)
        for p, g, m, v in zip(self.P, self.G, self.S, self.S2, strict=True):
            shape = (len(alive),) + (1,) * (p.dim() - 1)
            pp, gg, mm, vv = (self._pick(t, sel) for t in (p, g, m, v))
            if self.kind == "adamw":
                if any(w != 0 for w in wd):
                    pp.mul_(torch.tensor(decay).view(shape))
            else:
                # G is scratch (the next backward overwrites it), so L2 goes in place.
                _add_scaled(gg, pp, wd)
            if same_b1:
                mm.lerp_(gg, 1 - b1[0])
            else:
                mm.lerp_(gg, torch.tensor([1 - b for b in b1]).view(shape))
            vv.mul_(b2).addcmul_(gg, gg, value=1 - b2)
            denom = (vv.sqrt() / torch.tensor(bc2_sqrt).view(shape)).add_(_ADAM_EPS)
            pp.add_((mm * torch.tensor(step_size).view(shape)) / denom)
            for t, new in ((p, pp), (m, mm), (v, vv)):
                self._put(t, sel, new)

    def _sgd(self, alive: list[int], sel: Tensor | None) -> None:
        # torch.optim.SGD: the buffer starts as the first gradient, which a zero
        # buffer times the momentum plus the gradient is, bitwise. At momentum 0
        # torch steps by the gradient and leaves the buffer alone.
        mom = [self.momentum[i] for i in alive]
        wd = [self.decay[i] for i in alive]
        still = [j for j, m in enumerate(mom) if m == 0]
        mom_t = torch.tensor(mom)
        neg_lr = torch.tensor([-self.lr[i] for i in alive])
        for p, g, buf in zip(self.P, self.G, self.S, strict=True):
            shape = (len(alive),) + (1,) * (p.dim() - 1)
            pp, gg, bb = (self._pick(t, sel) for t in (p, g, buf))
            _add_scaled(gg, pp, wd)
            if still:
                old = bb[still].clone()
            bb.mul_(mom_t.view(shape)).add_(gg)
            step = bb
            if still:
                step = bb.clone()
                step[still] = gg[still]
                bb[still] = old
            pp.add_(step * neg_lr.view(shape))
            for t, new in ((p, pp), (buf, bb)):
                self._put(t, sel, new)

    def finish(self) -> None:
        for r, s in zip(self.runs, self.steps, strict=True):
            r.step = s


def _add_scaled(dst: Tensor, src: Tensor, alpha: list[float]) -> None:
    """``dst[j] += alpha[j] * src[j]`` rounded as ``Tensor.add_(alpha=)`` rounds it
    (torch.optim adds weight decay so), skipping zeros as torch.optim does."""
    if all(a == alpha[0] for a in alpha):
        if alpha[0] != 0:
            dst.add_(src, alpha=alpha[0])
        return
    for j, a in enumerate(alpha):
        if a != 0:
            dst[j].add_(src[j], alpha=a)


class _DropoutMasks:
    """Per-run dropout masks for each dropout site of a chunk, each step."""

    # int16 draws per run and site fetched at once (numpy call overhead amortised).
    BLOCK = 1 << 15

    def __init__(self, group: BatchedTrainee, runs: list[BatchedRun]):
        self.group, self.runs = group, runs
        self.sites = group.net.sites
        self.p = [r.dropout for r in runs]
        self.active = any(p > 0 for p in self.p) and bool(self.sites)
        if not self.active:
            return
        keep = [1.0 - p for p in self.p]
        # nn.Dropout scales kept units by 1 / (1 - p), computed in float32.
        self.scale = np.array([float(torch.ones(()).div_(q)) for q in keep], np.float32)[:, None]
        # Keep a unit when a uniform 16-bit integer (read as int16) is below this:
        # probability round(q * 2**16) / 2**16; runs with p = 0 keep everything.
        self.threshold = np.array([min(round(q * 65536) - 32768, 32767) for q in keep], np.int16)[
            :, None
        ]
        self.no_dropout = [i for i, p in enumerate(self.p) if p <= 0]
        self.bufs: dict[tuple[int, int], Tensor] = {}
        # Fast mode: each run's bits, one row per run, consumed in lockstep.
        self.bits = [np.empty((len(runs), 0), np.int16) for _ in self.sites]
        self.cursor = [0 for _ in self.sites]

    def _buffer(self, site_i: int, b: int) -> Tensor:
        key = (site_i, b)
        if key not in self.bufs:
            self.bufs[key] = torch.ones(len(self.runs), b, *self.sites[site_i].shape)
        return self.bufs[key]

    def _bits(self, s: int, n: int) -> np.ndarray:
        c, have = self.cursor[s], self.bits[s]
        if c + n > have.shape[1]:
            # Every row from its own run's generator, so a run's masks depend on
            # its seed and its own batch sizes only, never on the other runs.
            width = max(n, self.BLOCK)
            have = np.stack(
                [
                    r.dropout_rng.random_raw((width + 3) // 4).view(np.int16)[:width]
                    for r in self.runs
                ]
            )
            self.bits[s], c = have, 0
        self.cursor[s] = c + n
        return have[:, c : c + n]

    def draw(self, b: int, alive: list[int]) -> list[Tensor | None] | None:
        if not self.active:
            return None
        masks: list[Tensor | None] = []
        for s, site in enumerate(self.sites):
            f = site.features
            buf = self._buffer(s, b)
            if self.group.exact:
                for i in alive:
                    p = self.p[i]
                    if p > 0:  # nn.Dropout draws nothing at p = 0
                        rng = self.runs[i].dropout_rng
                        m = torch.empty(b, f).bernoulli_(1 - p, generator=rng).div_(1 - p)
                        buf[i] = site.from_module_order(m).view(buf.shape[1:])
            else:
                keep = np.less(self._bits(s, b * f), self.threshold)
                if self.no_dropout:
                    keep[self.no_dropout] = True
                np.multiply(keep, self.scale, out=buf.numpy().reshape(len(self.runs), b * f))
            masks.append(buf)
        return masks
