"""Batched training for any model family, with ``torch.func``.

:class:`FunctionalTrainee` is a :class:`~rlhpo.trainees.batched.BatchedTrainee`
whose network is :class:`FunctionalNet`: the task's own ``nn.Module`` called
with ``torch.func.functional_call`` under ``torch.func.vmap``, once for a whole
chunk of runs, on their weights stacked along a leading run axis. Everything
else is the batched backend's: runs built by :func:`rlhpo.trainees.init_model`
under their seed, their own :class:`~rlhpo.trainees.SampleOrder` data order,
groups by batch size and interval length (so every step sees exactly the rows
the unbatched Trainee's step sees), divergence per run, and the per-run
optimizer on stacked tensors (Adam, AdamW, SGD with momentum; per-run lr and
step count).

The gradient is autograd's, through the vmapped forward (one backward for the
chunk). Three things make an arbitrary module batchable this way:

- **Recurrent layers.** ``nn.GRU`` and ``nn.LSTM`` have no batching rule, so
  under ``vmap`` torch runs them one run at a time. The copy of the model that
  is called (:func:`functional_copy`) holds :class:`UnrolledGRU` /
  :class:`UnrolledLSTM` instead: the same parameters (same names), the same
  gate arithmetic written as matrix multiplies per time step, which ``vmap``
  turns into one batched multiply for all runs.
- **Dropout with a different ``p`` per run.** Every ``F.dropout`` call (that is
  every ``nn.Dropout``, and Hugging Face's functional attention dropout) and
  every ``F.scaled_dot_product_attention`` with ``dropout_p > 0`` is
  intercepted by a ``TorchFunctionMode`` and replaced by inverted dropout with
  the run's own ``p`` (a vmapped scalar), as ``set_dropout`` sets every dropout
  site of a model to the knob. Masks come from one generator per group
  (``vmap(randomness="different")``), seeded deterministically, so they have
  ``nn.Dropout``'s distribution but are not the unbatched run's masks: with
  dropout > 0 runs agree with unbatched ones statistically. ``nn.Dropout``
  modules of the called copy read the run's ``p`` themselves
  (:class:`_SiteDropout`), so the mode, which costs Python time on every op, is
  entered only for models that call ``F.dropout`` or attention directly.
- **Evaluation** calls the task's own module run by run (fused GRU/LSTM and
  attention kernels): faster than the vmapped unrolled copy on every family, and
  bitwise the Trainee's outputs. So does training where vmap loses: a lockstep
  group of one run, and every LSTM model.
- **Buffers** are the template's, shared by all runs (positions ids and the
  like); models whose buffers change while training (batch norm) are refused.

Routing: ``mlp`` and ``cnn1d`` keep the hand-written stacked backend (measured
faster for them: 297 vs 508 us per model-step on the MNIST-1D MLP at 32 runs,
experiments/results/throughput.md); every other family
whose model passes :func:`supports_functional` uses this one
(:func:`make_batched_trainee`). Per-token targets (the decoder LM: logits
``(batch, vocab, length)``, targets ``(batch, length)`` with -100 where a position is
not scored) take the Trainee's loss, ``F.cross_entropy`` with ``ignore_index=-100``,
run by run.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from rlhpo.knobs import set_dropout
from rlhpo.tasks.spec import TaskSpec
from rlhpo.trainees import init_model, task_data
from rlhpo.trainees.batched import (
    CHUNK_ELEMENTS,
    SNAPSHOT_CAP_BYTES,
    BatchedRun,
    BatchedTrainee,
    batchable_optimizer,
    supports_stacked,
)

Tensor = torch.Tensor

# Runs per vmapped call. Per run-step, 8 -> 32 runs gained 12% on seq-gru and 3% on
# seq-transformer (experiments/results/throughput_v2.md): little left to gain beyond.
MAX_CHUNK_RUNS = 32
# Dropout p given to the called copy's dropout sites so that every site calls
# F.dropout / sdpa with p > 0 and is intercepted; the run's own p replaces it.
_SENTINEL_P = 0.5
_MASK_SEED = 0x5EED


class UnrolledGRU(nn.Module):
    """``nn.GRU`` (unidirectional, no inter-layer dropout) as per-step matrix
    multiplies, with the same parameters, so that ``vmap`` can batch it."""

    gates = 3

    def __init__(self, rnn: nn.GRU | nn.LSTM):
        super().__init__()
        self.hidden_size = rnn.hidden_size
        self.num_layers = rnn.num_layers
        self.batch_first = rnn.batch_first
        self.bias = rnn.bias
        for name, p in rnn.named_parameters(recurse=False):
            self.register_parameter(name, p)

    def _layer(self, i: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        g = lambda n: getattr(self, f"{n}_l{i}", None)  # noqa: E731
        return g("weight_ih"), g("weight_hh"), g("bias_ih"), g("bias_hh")

    def _cell(self, gi: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None, c: Tensor | None):
        gh = F.linear(h, w_hh, b_hh)
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n), None

    def forward(self, x: Tensor, hx: Any = None):
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0 if self.batch_first else 1)
        if not self.batch_first:
            x = x.transpose(0, 1)
        b = x.shape[0]
        h0, c0 = self._initial(hx, b, x, unbatched)
        last_h, last_c = [], []
        for i in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self._layer(i)
            # Input projections of every time step at once; unbind, not gi[:, t]:
            # each select's backward writes a whole zero gi (measured 48% of a step).
            gis = F.linear(x, w_ih, b_ih).unbind(1)
            h, c = h0[i], (c0[i] if c0 is not None else None)
            outs = []
            for gi in gis:
                h, c = self._cell(gi, h, w_hh, b_hh, c)
                outs.append(h)
            x = torch.stack(outs, 1)
            last_h.append(h)
            last_c.append(c)
        out = x if self.batch_first else x.transpose(0, 1)
        h_n = torch.stack(last_h)
        state: Any = h_n if c0 is None else (h_n, torch.stack(last_c))
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            state = state.squeeze(1) if c0 is None else tuple(s.squeeze(1) for s in state)
        return out, state

    def _initial(self, hx: Any, b: int, x: Tensor, unbatched: bool):
        if hx is None:
            h0 = x.new_zeros(self.num_layers, b, self.hidden_size)
            return h0, None
        h0 = hx.unsqueeze(1) if unbatched else hx
        return h0, None


class UnrolledLSTM(UnrolledGRU):
    """``nn.LSTM`` (unidirectional, no projection, no inter-layer dropout)
    unrolled as :class:`UnrolledGRU`."""

    def _cell(self, gi: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None, c: Tensor | None):
        gates = gi + F.linear(h, w_hh, b_hh)
        i, f, g, o = gates.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def _initial(self, hx: Any, b: int, x: Tensor, unbatched: bool):
        if hx is None:
            z = x.new_zeros(self.num_layers, b, self.hidden_size)
            return z, z
        h0, c0 = hx
        return (h0.unsqueeze(1), c0.unsqueeze(1)) if unbatched else (h0, c0)


def _unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained through :class:`FunctionalNet`, or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            return f"{name or 'model'} ({type(m).__name__}) updates running statistics"
        if isinstance(m, (nn.GRU, nn.LSTM)):
            if m.bidirectional or (m.num_layers > 1 and m.dropout > 0):
                return f"{name} ({type(m).__name__}) is bidirectional or has inter-layer dropout"
            if getattr(m, "proj_size", 0):
                return f"{name} (LSTM) has a projection"
        elif isinstance(m, nn.RNNBase):
            return f"{name} ({type(m).__name__}) has no unrolled equivalent"
    return None


def functional_copy(model: nn.Module, runs: _RunDropout | None = None) -> nn.Module:
    """A copy of ``model`` to call with stacked weights: recurrent layers unrolled
    (same parameter names), dropout sites at a sentinel p (see module docstring).
    With ``runs``, every ``nn.Dropout`` becomes a :class:`_SiteDropout` reading it."""
    why = _unsupported(model)
    if why is not None:
        raise ValueError(f"model cannot be batched with torch.func: {why}")
    clone = copy.deepcopy(model)
    for name, m in list(clone.named_modules()):
        if isinstance(m, (nn.GRU, nn.LSTM)):
            parent = clone.get_submodule(name.rpartition(".")[0]) if "." in name else clone
            kind = UnrolledLSTM if isinstance(m, nn.LSTM) else UnrolledGRU
            setattr(parent, name.rpartition(".")[2], kind(m))
        elif runs is not None and type(m) is nn.Dropout:
            parent = clone.get_submodule(name.rpartition(".")[0]) if "." in name else clone
            setattr(parent, name.rpartition(".")[2], _SiteDropout(runs, m.p, m.inplace))
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _drop(x: Tensor, p: Tensor) -> Tensor:
    # Inverted dropout as nn.Dropout: keep with probability 1 - p, scale by 1 / (1 - p).
    keep = torch.rand_like(x) >= p
    return x * keep / (1 - p)


class _RunDropout(TorchFunctionMode):
    """Replaces every dropout in the forward pass with the current run's ``p``
    (``p`` None: dropout off), and attention with math that ``vmap`` batches.

    ``nn.Dropout`` modules of the called copy are :class:`_SiteDropout`, which read
    ``p`` here without the mode (``active`` while a vmapped fast pass runs): the
    mode costs Python time on every op, so it is entered only for models that call
    ``F.dropout`` or attention themselves (``saw_functional_dropout``,
    ``saw_attention``, learnt on the first pass, which always enters it)."""

    def __init__(self):
        super().__init__()
        self.p: Tensor | None = None
        self.active = False
        self.saw_attention = False
        self.saw_functional_dropout = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            self.saw_functional_dropout = True
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            return _drop(args[0], self.p) if training and self.p is not None else args[0]
        if func is F.scaled_dot_product_attention:
            # Torch's fused CPU attention has no batching rule: under vmap it runs
            # one run at a time (measured 1.6x slower per run than unbatched).
            self.saw_attention = True
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        # F.scaled_dot_product_attention's reference math, with the run's dropout.
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
        s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else scale
        w = (q @ k.transpose(-2, -1)) * s
        if is_causal:
            lq, lk = q.shape[-2], k.shape[-2]
            causal = torch.ones(lq, lk, dtype=torch.bool).tril()
            w = w.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            w = (
                w.masked_fill(~attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool
                else w + attn_mask
            )
        w = torch.softmax(w, -1)
        return (_drop(w, self.p) if dropout_p > 0 and self.p is not None else w) @ v


class _SiteDropout(nn.Dropout):
    """An ``nn.Dropout`` of the called copy: in a vmapped fast pass it drops with the
    run's own ``p`` from ``runs`` (no per-op mode needed); otherwise (exact mode,
    one run at a time) it is ``nn.Dropout`` with its own ``p``."""

    def __init__(self, runs: _RunDropout, p: float, inplace: bool):
        super().__init__(p, inplace)
        self.runs = runs

    def forward(self, x: Tensor) -> Tensor:
        if not self.runs.active:
            return super().forward(x)
        if self.training and self.runs.p is not None:
            return _drop(x, self.runs.p)
        return x


class FunctionalNet:
    """A task's module as a function of stacked weights, with the interface of
    :class:`~rlhpo.trainees.stacked.StackedNet` that the batched backend uses
    (``params_of``, ``load_into``, ``forward``, ``backward``, ``sites``).

    ``run_p`` must hold the chunk's per-run dropout p (``[k]``) before a training
    forward; ``mask_state`` is the mask generator's state, carried between calls.
    With ``run_rngs`` (exact mode, one torch generator per run) each run is called
    alone and draws its dropout masks as the unbatched Trainee does.
    """

    sites: list = []  # dropout is drawn inside forward, not by _DropoutMasks
    widest = 1

    def __init__(self, template: nn.Module):
        self._mode = _RunDropout()
        self.module = functional_copy(template, self._mode)
        # The task's own module, for evaluation (see forward).
        self.native = copy.deepcopy(template).eval().requires_grad_(False)
        # The unrolled LSTM lost to nn.LSTM run by run even at one batch size for all
        # (4 runs: 0.63x a Trainee; throughput_guard_families.md): never vmap it.
        self.run_by_run = any(isinstance(m, nn.LSTM) for m in template.modules())
        self.names = [n for n, _ in self.module.named_parameters()]
        self.buffers = dict(self.module.named_buffers())
        self.run_p: Tensor | None = None
        self.run_rngs: list[torch.Generator] | None = None
        self._calls = 0
        self._dropout_calls = 0
        self.mask_state = torch.Generator().manual_seed(_MASK_SEED).get_state()

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return _unsupported(model) is None

    # -- weights ------------------------------------------------------------
    def params_of(self, model: nn.Module) -> list[Tensor]:
        """Copies of ``model``'s parameters, in this net's order."""
        sd = dict(model.named_parameters())
        return [sd[n].detach().clone() for n in self.names]

    def load_into(self, model: nn.Module, params: list[Tensor]) -> nn.Module:
        """Write one run's parameters back into ``model``."""
        sd = dict(model.named_parameters())
        with torch.no_grad():
            for n, p in zip(self.names, params, strict=True):
                sd[n].copy_(p)
        return model

    # -- passes -------------------------------------------------------------
    def _call(self, params: tuple[Tensor, ...], x: Tensor) -> Tensor:
        return functional_call(
            self.module, (dict(zip(self.names, params, strict=True)), self.buffers), (x,)
        )

    def _call_native(self, P: list[Tensor], i: int, x: Tensor) -> Tensor:
        params = {n: p[i] for n, p in zip(self.names, P, strict=True)}
        return functional_call(self.native, (params, self.buffers), (x,))

    def _call_dropout(self, params: tuple[Tensor, ...], x: Tensor, p: Tensor) -> Tensor:
        self._mode.p = p
        return self._call(params, x)

    def _vmapped(self, leaves: tuple[Tensor, ...], x: Tensor, p: Tensor | None, **kw) -> Tensor:
        mode = self._mode
        if p is None:
            mode.p = None
            fn, args = self._call, (leaves, x)
        else:
            fn, args = self._call_dropout, (leaves, x, p)
        mode.active = True
        try:
            # The mode costs Python time on every op: enter it only where it acts
            # (learnt on the first call, and on the first with dropout, which some
            # models only call with p > 0: both always enter it).
            learnt = self._calls > 0 and (p is None or self._dropout_calls > 0)
            if learnt and not (mode.saw_attention or mode.saw_functional_dropout):
                return vmap(fn, **kw)(*args)
            self._calls += 1
            self._dropout_calls += p is not None
            with mode:
                return vmap(fn, **kw)(*args)
        finally:
            mode.active = False

    def forward(
        self,
        P: list[Tensor],
        x: Tensor,
        masks: Any = None,
        ctx: list | None = None,
        shared: bool = False,
    ) -> Tensor:
        """Outputs ``[k, b, d_out]``: ``x`` is ``[k, b, *input]`` or, with ``shared``,
        ``[n, *input]`` for every run (evaluation, no dropout, no gradient). With
        ``ctx`` (training) the graph is kept there for :meth:`backward`."""
        if ctx is None:
            with torch.no_grad():
                if shared:
                    # Run by run through the task's own module (fused GRU/LSTM, fused
                    # attention): measured faster than the vmapped unrolled copy at 5 and
                    # 32 runs on every family of the default suite (at 32 runs: GRU 2.1x,
                    # LSTM 4.9x, encoder 1.1x, decoder 1.3x; vmap's cost grew linearly
                    # with the runs), and the same kernels as Trainee.evaluate.
                    return torch.stack([self._call_native(P, i, x) for i in range(len(P[0]))])
                self.module.eval()
                return self._vmapped(tuple(P), x, None, in_dims=(0, 0))
        self.module.train()
        leaves = tuple(p.detach().requires_grad_() for p in P)
        p = self.run_p
        if self.run_rngs is not None:
            out = self._forward_each(leaves, x, p)
            ctx.append((leaves, out))
            return out.detach()
        dropout = p is not None and bool((p > 0).any())
        with torch.random.fork_rng(devices=[]):
            torch.random.set_rng_state(self.mask_state)
            if len(x) == 1 or self.run_by_run:
                out = self._native_each(leaves, x, p if dropout else None)
            else:
                set_dropout(self.module, _SENTINEL_P if dropout else 0.0)
                out = self._vmapped(leaves, x, p if dropout else None, randomness="different")
            self.mask_state = torch.random.get_rng_state()
        ctx.append((leaves, out))
        return out.detach()

    def _native_each(self, leaves: tuple[Tensor, ...], x: Tensor, p: Tensor | None) -> Tensor:
        # Run by run through the task's own module (fused kernels), each run's dropout
        # at its p from the group's mask stream. A lockstep group of one gains nothing
        # from vmap and loses the fused kernels: measured 0.7x a Trainee on the GRU,
        # encoder and 2D CNN tasks with mixed batch sizes, ~0.95x this way
        # (experiments/results/throughput_guard_families.md).
        self.native.train()
        outs = []
        for i in range(len(x)):
            set_dropout(self.native, float(p[i]) if p is not None else 0.0)
            params = {n: w[i] for n, w in zip(self.names, leaves, strict=True)}
            outs.append(functional_call(self.native, (params, self.buffers), (x[i],)))
        self.native.eval()
        return torch.stack(outs)

    def _forward_each(self, leaves: tuple[Tensor, ...], x: Tensor, p: Tensor | None) -> Tensor:
        # Exact mode: each run alone, its dropout drawn by the module's own dropout
        # from the run's stream, as the unbatched Trainee draws it.
        outs = []
        for i, rng in enumerate(self.run_rngs or []):
            set_dropout(self.module, float(p[i]) if p is not None else 0.0)
            with torch.random.fork_rng(devices=[]):
                torch.random.set_rng_state(rng.get_state())
                outs.append(self._call(tuple(w[i] for w in leaves), x[i]))
                rng.set_state(torch.random.get_rng_state())
        return torch.stack(outs)

    def backward(self, P: list[Tensor], G: list[Tensor], dout: Tensor, ctx: list) -> None:
        """Gradients of the chunk's loss (``dout`` = d loss / d out) into ``G``."""
        leaves, out = ctx.pop()
        grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
        for g, gr in zip(G, grads, strict=True):
            if gr is None:
                g.zero_()
            else:
                g.copy_(gr)


def supports_functional(spec: TaskSpec) -> bool:
    """Whether runs of ``spec`` can be batched by :class:`FunctionalTrainee`."""
    if not batchable_optimizer(spec):
        return False
    key = repr((spec.model, spec.model_args, spec.dataset, spec.dataset_args, spec.metric))
    if key not in _SUPPORTED:
        data = task_data(spec)
        # One target per sample, or per position for classification (a language model).
        targets = data.y_train.dim() == 1 or (data.y_train.dim() == 2 and spec.metric == "accuracy")
        _SUPPORTED[key] = targets and FunctionalNet.supports(init_model(spec, data, 0.0, 0))
    return _SUPPORTED[key]


_SUPPORTED: dict[str, bool] = {}


class FunctionalTrainee(BatchedTrainee):
    """Runs of one task of any model family, trained together with ``torch.func``.

    As :class:`~rlhpo.trainees.batched.BatchedTrainee` (``add``, ``train``,
    ``evaluate``, runs with the Trainee interface), plus:

    Args:
        max_chunk_runs: runs per vmapped call.
    """

    def __init__(
        self,
        spec: TaskSpec,
        exact: bool = False,
        chunk_elements: int = CHUNK_ELEMENTS,
        max_chunk_runs: int = MAX_CHUNK_RUNS,
        snapshot_cap_bytes: int | None = SNAPSHOT_CAP_BYTES,
    ):
        if max_chunk_runs < 1:
            raise ValueError(f"max_chunk_runs must be >= 1, got {max_chunk_runs}")
        self.max_chunk_runs = int(max_chunk_runs)
        super().__init__(
            spec, exact=exact, chunk_elements=chunk_elements, snapshot_cap_bytes=snapshot_cap_bytes
        )

    @classmethod
    def supports(cls, spec: TaskSpec) -> bool:
        return supports_functional(spec)

    def build_net(self, template: nn.Module) -> FunctionalNet:
        return FunctionalNet(template)

    def chunk_size(self, rows: int) -> int:
        return self.max_chunk_runs

    def loss_and_grad(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if y.dim() == 2:
            return super().loss_and_grad(out, y)
        # Per-position targets: the Trainee's nn.CrossEntropyLoss (mean over the
        # positions whose target is not -100), run by run, differentiated by autograd.
        leaf = out.detach().requires_grad_()
        with torch.enable_grad():
            loss = torch.stack([F.cross_entropy(leaf[i], y[i]) for i in range(len(y))])
            (dout,) = torch.autograd.grad(loss.sum(), leaf)
        return loss.detach(), dout

    def _train_chunk(self, runs: list[BatchedRun], bs: int, n: int):
        self.net.run_p = torch.tensor([r.dropout for r in runs])
        self.net.run_rngs = [r.dropout_rng for r in runs] if self.exact else None
        try:
            return super()._train_chunk(runs, bs, n)
        finally:
            self.net.run_p = self.net.run_rngs = None


def make_batched_trainee(
    spec: TaskSpec,
    exact: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
    snapshot_cap_bytes: int | None = SNAPSHOT_CAP_BYTES,
) -> BatchedTrainee:
    """The batched backend for ``spec``: hand-written stacked passes for ``mlp``
    and ``cnn1d``, ``torch.func`` for every other supported family."""
    kind = BatchedTrainee if supports_stacked(spec) else FunctionalTrainee
    return kind(
        spec, exact=exact, chunk_elements=chunk_elements, snapshot_cap_bytes=snapshot_cap_bytes
    )
