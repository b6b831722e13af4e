"""Many copies of one small network, with their weights stacked along a leading
model axis and trained with explicit forward and backward passes.

Every layer works on ``[k, batch, ...]`` tensors, where ``k`` is the number of
models: a linear layer is one batched matrix multiply (``baddbmm``) for all ``k``
models, a 1-D convolution is an im2col unfold followed by one. The backward pass
is written out by hand (it is short for these layers) because autograd's
per-operation overhead was measured at 25-35% of a step for these small models
(see experiments/throughput.py). Each backward mirrors what autograd computes
for the unbatched module, operation by operation (``threshold_backward`` for
ReLU, ``_log_softmax_backward_data`` for cross-entropy, ``dy^T x`` for weights).

Supported: rlhpo's ``MLP`` and ``CNN1D`` (``rlhpo.tasks.models``). A
:class:`StackedNet` only knows the architecture; the weights live in lists of
tensors passed in, one ``[k, ...]`` tensor per parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from rlhpo.tasks.models import CNN1D, MLP

Tensor = torch.Tensor


@dataclass
class DropoutSite:
    """A dropout module after a ReLU: where masks are drawn, and their shape.

    ``shape`` is the per-sample activation shape in stacked layout;
    ``from_module_order`` reorders a mask drawn in the unbatched module's layout
    (``[b, features]``) into it, so exact mode can replay ``nn.Dropout``'s masks.
    """

    shape: tuple[int, ...]
    from_module_order: Callable[[Tensor], Tensor]

    @property
    def features(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class _ParamMap:
    """How one module parameter maps to its per-model stacked layout and back."""

    name: str
    to_stacked: Callable[[Tensor], Tensor]
    from_stacked: Callable[[Tensor], Tensor]


class _Linear:
    def __init__(self, pi: int, d_in: int, d_out: int, need_dx: bool):
        self.pi, self.d_in, self.d_out, self.need_dx = pi, d_in, d_out, need_dx

    def forward(self, P: list[Tensor], x: Tensor, ctx: list) -> Tensor:
        # Weight kept as nn.Linear's [out, in]: y = b + x W^T, as F.linear computes.
        w, b = P[self.pi], P[self.pi + 1]
        if ctx is not None:
            ctx.append(x)
        if x.dim() == 2:  # evaluation input shared by all models
            return torch.matmul(x, w.transpose(1, 2)).add_(b)
        return torch.baddbmm(b, x, w.transpose(1, 2))

    def backward(self, P: list[Tensor], G: list[Tensor], dy: Tensor, ctx: list) -> Tensor | None:
        x = ctx.pop()
        torch.bmm(dy.transpose(1, 2), x, out=G[self.pi])
        torch.sum(dy, 1, keepdim=True, out=G[self.pi + 1])
        return torch.bmm(dy, P[self.pi]) if self.need_dx else None


class _Conv1d:
    """Conv1d on channels-last activations ``[k, b, L, C]`` via im2col + bmm."""

    def __init__(self, pi: int, conv: nn.Conv1d, length: int, need_dx: bool):
        self.pi, self.need_dx = pi, need_dx
        self.c_in, self.c_out = conv.in_channels, conv.out_channels
        self.kernel, self.stride, self.pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        if conv.dilation[0] != 1 or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("stacked Conv1d supports dilation 1, groups 1, zero padding only")
        self.length = length
        self.l_out = (length + 2 * self.pad - self.kernel) // self.stride + 1

    def _cols(self, x: Tensor) -> Tensor:
        k, b = x.shape[0], x.shape[1]
        xp = F.pad(x, (0, 0, self.pad, self.pad)) if self.pad else x
        # [k, b, L_out, K, C_in]: the (K, C_in) order of the stacked weight
        # [C_out, K, C_in], so that col2im below adds contiguous C_in rows.
        cols = xp.unfold(2, self.kernel, self.stride).transpose(3, 4)
        return cols.reshape(k, b * self.l_out, self.kernel * self.c_in)

    def forward(self, P: list[Tensor], x: Tensor, ctx: list) -> Tensor:
        k, b = x.shape[0], x.shape[1]
        w, bias = P[self.pi], P[self.pi + 1]
        cols = self._cols(x)
        if ctx is not None:
            ctx.append(cols)
        y = torch.baddbmm(bias, cols, w.view(k, self.c_out, -1).transpose(1, 2))
        return y.view(k, b, self.l_out, self.c_out)

    def backward(self, P: list[Tensor], G: list[Tensor], dy: Tensor, ctx: list) -> Tensor | None:
        cols = ctx.pop()
        k, b = dy.shape[0], dy.shape[1]
        dy2 = dy.reshape(k, b * self.l_out, self.c_out)
        torch.bmm(dy2.transpose(1, 2), cols, out=G[self.pi].view(k, self.c_out, -1))
        torch.sum(dy2, 1, keepdim=True, out=G[self.pi + 1])
        if not self.need_dx:
            return None
        dcols = torch.bmm(dy2, P[self.pi].view(k, self.c_out, -1))
        dcols = dcols.view(k, b, self.l_out, self.kernel, self.c_in)
        dxp = dy.new_zeros(k, b, self.length + 2 * self.pad, self.c_in)
        span = self.stride * (self.l_out - 1) + 1
        for j in range(self.kernel):  # col2im: add each tap back where it was read
            dxp[:, :, j : j + span : self.stride, :].add_(dcols[:, :, :, j, :])
        return dxp[:, :, self.pad : self.pad + self.length, :]


class _ReLU:
    """ReLU, optionally followed by dropout (site index into the masks list)."""

    def __init__(self, site: int | None):
        self.site = site

    def forward(self, masks: list[Tensor | None] | None, a: Tensor, ctx: list) -> Tensor:
        a = a.clamp_min_(0)  # in place: the pre-activation is not needed again
        m = masks[self.site] if (masks is not None and self.site is not None) else None
        if m is not None:
            a = a.mul_(m)
        if ctx is not None:
            ctx.append((a, m))
        return a

    def backward(self, dy: Tensor, ctx: list) -> Tensor:
        h, m = ctx.pop()
        if m is not None:
            dy = dy.mul_(m)  # dy is this pass's own fresh tensor
        # As autograd: zero where the (dropped-out) output is not positive.
        return torch.ops.aten.threshold_backward(dy, h, 0)


class _Flatten:
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2)

    def backward(self, dy: Tensor, shape: tuple[int, ...]) -> Tensor:
        return dy.view(shape)


@dataclass
class StackedNet:
    """The architecture of a supported model, as stacked layers.

    Build with :meth:`for_model`; move weights with :meth:`params_of` and
    :meth:`load_into`.
    """

    kind: str
    layers: list = field(default_factory=list)
    maps: list[_ParamMap] = field(default_factory=list)
    sites: list[DropoutSite] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    widest: int = 1  # largest layer output (elements per sample), for chunk sizing

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return type(model) in (MLP, CNN1D)

    @classmethod
    def for_model(cls, model: nn.Module, input_shape: tuple[int, ...]) -> StackedNet:
        """The stacked form of ``model`` (an rlhpo ``MLP`` or ``CNN1D``)."""
        if type(model) is MLP:
            return cls._build("mlp", list(model.net.named_children()), "net.", input_shape)
        if type(model) is CNN1D:
            mods = [("convs." + n, m) for n, m in model.convs.named_children()]
            mods += [("head." + n, m) for n, m in model.head.named_children()]
            return cls._build("cnn1d", mods, "", input_shape)
        raise ValueError(
            f"no stacked form for {type(model).__name__}; supported: MLP, CNN1D "
            "(other models train one per env)"
        )

    @classmethod
    def _build(cls, kind: str, mods: list, prefix: str, input_shape) -> StackedNet:
        net = cls(kind)
        if kind == "mlp":
            act: tuple[int, ...] = (_numel(tuple(input_shape)),)
        else:
            act = (int(input_shape[0]), 1)  # channels-last [L, C]
        flattened: tuple[int, ...] | None = None  # (L, C) of a flattened conv output
        types = [type(m) for _, m in mods]
        i = 0
        while i < len(mods):
            name, m = prefix + mods[i][0], mods[i][1]
            need_dx = bool(net.maps)  # no input gradient for the first layer
            if isinstance(m, nn.Linear):
                pi = len(net.maps)
                wmap = _linear_after_flatten(flattened) if flattened else (_same, _same)
                flattened = None
                net.maps += [
                    _ParamMap(name + ".weight", *wmap),
                    _ParamMap(name + ".bias", _bias_to, _bias_from),
                ]
                net.shapes += [(m.out_features, m.in_features), (1, m.out_features)]
                net.layers.append(_Linear(pi, m.in_features, m.out_features, need_dx))
                act = (m.out_features,)
            elif isinstance(m, nn.Conv1d):
                layer = _Conv1d(len(net.maps), m, act[0], need_dx)
                net.maps += [
                    _ParamMap(name + ".weight", _conv_to, _conv_to),  # [C_out, K, C_in]
                    _ParamMap(name + ".bias", _bias_to, _bias_from),
                ]
                c_out, c_in, kernel = m.weight.shape
                net.shapes += [(c_out, kernel, c_in), (1, m.out_channels)]
                net.layers.append(layer)
                act = (layer.l_out, layer.c_out)
            elif isinstance(m, nn.ReLU):
                # Dropout right after the ReLU, or after a Flatten (the CNN head), is
                # folded into it: elementwise, so it commutes with the flatten.
                after = types[i + 1 : i + 3]
                site = None
                if after[:1] == [nn.Dropout] or after == [nn.Flatten, nn.Dropout]:
                    site = len(net.sites)
                    net.sites.append(DropoutSite(act, _module_order(act)))
                net.layers.append(_ReLU(site))
                if site is not None:
                    if after[0] is nn.Flatten:
                        flattened, act = act, (_numel(act),)
                        net.layers.append(_Flatten())
                        i += 1
                    i += 1
            elif isinstance(m, nn.Flatten):
                flattened, act = act, (_numel(act),)
                net.layers.append(_Flatten())
            else:
                raise ValueError(
                    f"{name}: no stacked form for {type(m).__name__} here "
                    "(supported: Linear, Conv1d, ReLU with optional Dropout, Flatten)"
                )
            net.widest = max(net.widest, _numel(act))
            i += 1
        return net

    # -- weights ------------------------------------------------------------
    def params_of(self, model: nn.Module) -> list[Tensor]:
        """Copies of ``model``'s parameters in stacked layout (no model axis)."""
        sd = dict(model.named_parameters())
        return [mp.to_stacked(sd[mp.name].detach()).contiguous().clone() for mp in self.maps]

    def load_into(self, model: nn.Module, params: list[Tensor]) -> nn.Module:
        """Write one model's stacked-layout parameters back into ``model``."""
        sd = dict(model.named_parameters())
        with torch.no_grad():
            for mp, p in zip(self.maps, params, strict=True):
                sd[mp.name].copy_(mp.from_stacked(p).reshape(sd[mp.name].shape))
        return model

    # -- passes -------------------------------------------------------------
    def forward(
        self,
        P: list[Tensor],
        x: Tensor,
        masks: list[Tensor | None] | None = None,
        ctx: list | None = None,
        shared: bool = False,
    ) -> Tensor:
        """Outputs ``[k, b, d_out]``.

        ``x`` is ``[k, b, *input]`` (one batch per model) or, with ``shared``,
        ``[n, *input]`` seen by every model (evaluation). With ``ctx`` (a list) the
        pass keeps what :meth:`backward` needs; ``masks`` (one per dropout site,
        ``[k, b, *site.shape]`` or None) apply dropout.
        """
        k = P[0].shape[0]
        lead = 1 if shared else 2
        if self.kind == "mlp":
            h = x.flatten(lead) if x.dim() > lead + 1 else x
        else:
            h = x.unsqueeze(-1)  # [.., L] -> channels-last [.., L, 1]
            if shared:
                h = h.unsqueeze(0).expand(k, *h.shape)
        for layer in self.layers:
            if isinstance(layer, _ReLU):
                h = layer.forward(masks, h, ctx)
            elif isinstance(layer, _Flatten):
                if ctx is not None:
                    ctx.append(h.shape)
                h = layer.forward(h)
            else:
                h = layer.forward(P, h, ctx)
        return h

    def backward(self, P: list[Tensor], G: list[Tensor], dout: Tensor, ctx: list) -> None:
        """Gradients of the loss whose output gradient is ``dout`` into ``G``."""
        d: Tensor | None = dout
        for layer in reversed(self.layers):
            if isinstance(layer, _ReLU):
                d = layer.backward(d, ctx)
            elif isinstance(layer, _Flatten):
                d = layer.backward(d, ctx.pop())
            else:
                d = layer.backward(P, G, d, ctx)
                if d is None:
                    break


def _same(t: Tensor) -> Tensor:
    return t


def _conv_to(w: Tensor) -> Tensor:
    # [C_out, C_in, K] <-> [C_out, K, C_in] (its own inverse)
    return w.transpose(1, 2)


def _bias_to(b: Tensor) -> Tensor:
    return b.reshape(1, -1)


def _bias_from(b: Tensor) -> Tensor:
    return b.reshape(-1)


def _linear_after_flatten(act: tuple[int, ...]) -> tuple[Callable, Callable]:
    """Weight maps of the first linear layer after a conv stack: the module
    flattens ``[C, L]``, the stacked net ``[L, C]``, so the columns are permuted."""
    if len(act) != 2:
        return _same, _same
    length, ch = act

    def to_stacked(w: Tensor) -> Tensor:
        return w.reshape(w.shape[0], ch, length).transpose(1, 2).reshape(w.shape[0], -1)

    def from_stacked(w: Tensor) -> Tensor:
        return w.reshape(w.shape[0], length, ch).transpose(1, 2).reshape(w.shape[0], -1)

    return to_stacked, from_stacked


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _module_order(act: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    """Reorder a ``[b, features]`` mask from the module's layout into ``act``'s."""
    if len(act) == 2:  # conv output: module [C, L], stacked [L, C]
        length, ch = act

        def reorder(m: Tensor) -> Tensor:
            return m.reshape(m.shape[0], ch, length).transpose(1, 2).reshape(m.shape[0], -1)

        return reorder
    return lambda m: m


def loss_and_grad(
    metric: str, out: Tensor, y: Tensor, exact: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-model mean loss ``[k]`` and its gradient w.r.t. ``out`` ``[k, b, d]``.

    Cross-entropy for ``accuracy`` tasks, MSE for ``r2``, each model's loss the
    mean over its own batch (as ``nn.CrossEntropyLoss`` / ``mse_loss``). The
    gradient is computed as autograd computes it for the unbatched loss.
    """
    b = out.shape[1]
    if metric == "accuracy":
        # torch's log_softmax over a short last dim was measured ~35x slower than
        # over dim 1 of the transposed [k, C, b]; equal values except in the last
        # ulp for some elements, so exact mode keeps the unbatched layout.
        dim = -1 if exact else 1
        logp = torch.log_softmax(out if exact else out.transpose(1, 2).contiguous(), dim)
        idx = y.unsqueeze(dim)
        loss = logp.gather(dim, idx).squeeze(dim).sum(1).neg_().div_(b)
        # nll_loss's backward (-1/b at the target) then log_softmax's, as autograd.
        g = torch.zeros_like(logp).scatter_(dim, idx, -1.0 / b)
        dout = torch.ops.aten._log_softmax_backward_data(g, logp, dim, out.dtype)
        return loss, dout if exact else dout.transpose(1, 2).contiguous()
    pred = out.squeeze(-1)
    diff = pred - y
    loss = (diff * diff).sum(1).div_(b)
    return loss, diff.mul_(2.0 / b).unsqueeze(-1)
