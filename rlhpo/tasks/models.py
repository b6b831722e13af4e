"""Model builders. Every model has dropout modules so the dropout knob acts on it.

``transformer`` is a Hugging Face BERT built from a config (no download);
``encoder`` (pre- or post-LN) and ``decoder`` (a GPT-2 style causal LM) are
built here from torch layers. Arguments are checked against caps so that a
suite cannot ask for a model that would not fit in memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlhpo.tasks.spec import SpecError

# Default arguments per model. A tuple lists the allowed strings, its first the default.
MODEL_ARGS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [128, 128]},
    "resmlp": {"width": 64, "blocks": 2, "norm": ("pre", "post")},
    "cnn1d": {"channels": [32, 32], "kernel": 5, "hidden": 64},
    "cnn2d": {"channels": [16, 32], "kernel": 3, "hidden": 64},
    "gru": {"hidden": 64, "embed": 32},
    "lstm": {"hidden": 64, "embed": 32},
    "transformer": {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64},
    "encoder": {
        "hidden": 32,
        "layers": 2,
        "heads": 2,
        "intermediate": 64,
        "norm": ("pre", "post"),
    },
    "decoder": {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64},
}
# Models that read token ids; `decoder` predicts the next token at every position.
TOKEN_MODELS = ("transformer", "encoder", "decoder")
RECURRENT_MODELS = ("gru", "lstm")
# Upper bounds on sizes (a width of 30,000,000 would allocate gigabytes before failing).
MODEL_CAPS = {
    "width": 1024,
    "hidden": 1024,
    "embed": 1024,
    "intermediate": 4096,
    "channels": 512,
    "kernel": 15,
    "layers": 12,
    "blocks": 12,
    "heads": 16,
    "depth": 12,  # entries in a list of layer widths
}


def check_model_args(model: str, args: dict[str, Any], where: str) -> None:
    allowed = MODEL_ARGS[model]
    for k, v in args.items():
        if k not in allowed:
            raise SpecError(
                f"{where}: unknown key {k!r} for model {model!r} (allowed: {', '.join(sorted(allowed))})"
            )
        want = allowed[k]
        cap = MODEL_CAPS.get(k)
        if isinstance(want, tuple):
            if v not in want:
                raise SpecError(f"{where}: key {k!r} must be one of {list(want)}, got {v!r}")
        elif isinstance(want, list):
            if not (
                isinstance(v, list)
                and v
                and all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in v)
            ):
                raise SpecError(
                    f"{where}: key {k!r} must be a non-empty list of positive ints, got {v!r}"
                )
            if len(v) > MODEL_CAPS["depth"]:
                raise SpecError(
                    f"{where}: key {k!r} may hold at most {MODEL_CAPS['depth']} layers "
                    f"(the cap), got {len(v)}"
                )
            if cap is not None and max(v) > cap:
                raise SpecError(f"{where}: key {k!r} must be <= {cap} (the cap), got {v!r}")
        elif not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise SpecError(f"{where}: key {k!r} must be a positive int, got {v!r}")
        elif cap is not None and v > cap:
            raise SpecError(f"{where}: key {k!r} must be <= {cap} (the cap), got {v!r}")
    a = {**allowed, **args}
    if "heads" in a and a["hidden"] % a["heads"]:
        raise SpecError(
            f"{where}: hidden ({a['hidden']}) must be divisible by heads ({a['heads']})"
        )


class MLP(nn.Module):
    def __init__(self, d_in: int, d_out: int, hidden: list[int], p: float):
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(p)]
            d = h
        layers.append(nn.Linear(d, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class ResidualMLP(nn.Module):
    """Residual blocks ``x + FF(x)`` with LayerNorm before (pre) or after (post) the sum."""

    def __init__(self, d_in: int, d_out: int, width: int, blocks: int, norm: str, p: float):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.pre = norm == "pre"
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.ffs = nn.ModuleList(
            nn.Sequential(
                nn.Linear(width, 2 * width), nn.ReLU(), nn.Dropout(p), nn.Linear(2 * width, width)
            )
            for _ in range(blocks)
        )
        self.final = nn.LayerNorm(width) if self.pre else nn.Identity()
        self.out = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))
        for norm, ff in zip(self.norms, self.ffs, strict=True):
            h = h + ff(norm(h)) if self.pre else norm(h + ff(h))
        return self.out(self.final(h))


class CNN2D(nn.Module):
    """Conv2d layers (stride 2) over a square image given as its flattened pixels."""

    def __init__(
        self, side: int, d_out: int, channels: list[int], kernel: int, hidden: int, p: float
    ):
        super().__init__()
        self.side = side
        convs: list[nn.Module] = []
        c_in = 1
        for c in channels:
            convs += [nn.Conv2d(c_in, c, kernel, padding=kernel // 2, stride=2), nn.ReLU()]
            c_in = c
        self.convs = nn.Sequential(*convs)
        with torch.no_grad():
            n_flat = self.convs(torch.zeros(1, 1, side, side)).numel()
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(p),
            nn.Linear(n_flat, hidden),
            nn.ReLU(),
            nn.Dropout(p),
            nn.Linear(hidden, d_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x.view(-1, 1, self.side, self.side)))


class CNN1D(nn.Module):
    def __init__(
        self, length: int, d_out: int, channels: list[int], kernel: int, hidden: int, p: float
    ):
        super().__init__()
        convs: list[nn.Module] = []
        c_in = 1
        for c in channels:
            convs += [nn.Conv1d(c_in, c, kernel, padding=kernel // 2, stride=2), nn.ReLU()]
            c_in = c
        self.convs = nn.Sequential(*convs)
        with torch.no_grad():
            n_flat = self.convs(torch.zeros(1, 1, length)).numel()
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(p),
            nn.Linear(n_flat, hidden),
            nn.ReLU(),
            nn.Dropout(p),
            nn.Linear(hidden, d_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x.unsqueeze(1)))


class GRUClassifier(nn.Module):
    """A GRU (or LSTM) over tokens (embedded) or over the features of a vector, one per step."""

    def __init__(
        self, d_out: int, hidden: int, embed: int, p: float, vocab: int = 0, cell: str = "gru"
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed) if vocab else None
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        # The attribute keeps its name so that saved GRU state dicts still load.
        self.gru = rnn(embed if vocab else 1, hidden, batch_first=True)
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.embed(x) if self.embed is not None else x.unsqueeze(-1)
        _, h = self.gru(self.drop(seq) if self.embed is not None else seq)
        if isinstance(h, tuple):  # LSTM: (h, c)
            h = h[0]
        return self.out(self.drop(h[-1]))


class TokenTransformer(nn.Module):
    """Token + learned position embeddings and transformer blocks built from a config.

    ``causal=False``: an encoder classifier (mean-pooled), LayerNorm before (pre-LN)
    or after (post-LN, the original Transformer) each sub-layer.
    ``causal=True``: a GPT-2 style decoder LM (pre-LN, GELU, final LayerNorm) that
    returns next-token logits as ``(batch, vocab, length)``, the layout
    ``CrossEntropyLoss`` takes for per-position targets.
    """

    def __init__(
        self,
        vocab: int,
        length: int,
        d_out: int,
        hidden: int,
        layers: int,
        heads: int,
        intermediate: int,
        p: float,
        norm: str = "pre",
        causal: bool = False,
    ):
        super().__init__()
        self.causal = causal
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(length, hidden)
        self.drop = nn.Dropout(p)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden,
                heads,
                intermediate,
                dropout=p,
                activation="gelu" if causal else "relu",
                batch_first=True,
                norm_first=norm == "pre",
            )
            for _ in range(layers)
        )
        self.final = nn.LayerNorm(hidden) if norm == "pre" else nn.Identity()
        self.out = nn.Linear(hidden, d_out)
        mask = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.drop(self.tok(x) + self.pos(torch.arange(t, device=x.device)))
        mask = self.mask[:t, :t] if self.causal else None
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=self.causal)
        h = self.final(h)
        if self.causal:
            return self.out(h).transpose(1, 2)
        return self.out(h.mean(1))


class HFSequenceClassifier(nn.Module):
    """A Hugging Face BERT-style classifier built from a config, called on token ids."""

    def __init__(
        self,
        vocab: int,
        length: int,
        d_out: int,
        hidden: int,
        layers: int,
        heads: int,
        intermediate: int,
        p: float,
    ):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
            max_position_embeddings=max(length, 8),
            type_vocab_size=1,
            num_labels=d_out,
            hidden_dropout_prob=p,
            attention_probs_dropout_prob=p,
        )
        self.hf = BertForSequenceClassification(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=x).logits


def build_model(model: str, args: dict[str, Any], data: Any, dropout: float = 0.1) -> nn.Module:
    """Build a model for a task's data (``rlhpo.tasks.datasets.TaskData``)."""
    a = {k: v[0] if isinstance(v, tuple) else v for k, v in MODEL_ARGS[model].items()}
    a.update(args or {})
    d_out = data.n_classes or 1
    shape = data.input_shape
    if data.tokens and model not in TOKEN_MODELS + RECURRENT_MODELS:
        raise SpecError(f"model {model!r} does not take token sequences")
    if getattr(data, "per_token", False) != (model == "decoder"):
        raise SpecError(
            f"model {model!r} does not fit this data: next-token datasets need model 'decoder' "
            f"and 'decoder' needs a next-token dataset"
        )
    if model == "mlp":
        return MLP(int(torch.tensor(shape).prod()), d_out, a["hidden"], dropout)
    if model == "resmlp":
        d_in = int(torch.tensor(shape).prod())
        return ResidualMLP(d_in, d_out, a["width"], a["blocks"], a["norm"], dropout)
    if model == "cnn1d":
        return CNN1D(shape[0], d_out, a["channels"], a["kernel"], a["hidden"], dropout)
    if model == "cnn2d":
        side = int(round(shape[0] ** 0.5))
        if len(shape) != 1 or side * side != shape[0]:
            raise SpecError(f"model 'cnn2d' needs square images, got {shape[0]} features")
        return CNN2D(side, d_out, a["channels"], a["kernel"], a["hidden"], dropout)
    if model in RECURRENT_MODELS:
        return GRUClassifier(
            d_out,
            a["hidden"],
            a["embed"],
            dropout,
            vocab=data.vocab if data.tokens else 0,
            cell=model,
        )
    if model in ("encoder", "decoder"):
        return TokenTransformer(
            data.vocab,
            shape[0],
            d_out,
            a["hidden"],
            a["layers"],
            a["heads"],
            a["intermediate"],
            dropout,
            norm=a.get("norm", "pre"),
            causal=model == "decoder",
        )
    if model == "transformer":
        return HFSequenceClassifier(
            data.vocab,
            shape[0],
            d_out,
            a["hidden"],
            a["layers"],
            a["heads"],
            a["intermediate"],
            dropout,
        )
    raise SpecError(f"unknown model {model!r}")
