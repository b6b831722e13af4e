"""Model builders. Every model has dropout modules so the dropout knob acts on it.

The transformer is a Hugging Face model built from a config (no download).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlhpo.tasks.spec import SpecError

MODEL_ARGS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [128, 128]},
    "cnn1d": {"channels": [32, 32], "kernel": 5, "hidden": 64},
    "gru": {"hidden": 64, "embed": 32},
    "transformer": {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64},
}


def check_model_args(model: str, args: dict[str, Any], where: str) -> None:
    allowed = MODEL_ARGS[model]
    for k, v in args.items():
        if k not in allowed:
            raise SpecError(
                f"{where}: unknown key {k!r} for model {model!r} (allowed: {', '.join(sorted(allowed))})"
            )
        want = allowed[k]
        if isinstance(want, list):
            if not (isinstance(v, list) and v and all(isinstance(i, int) and i > 0 for i in v)):
                raise SpecError(
                    f"{where}: key {k!r} must be a non-empty list of positive ints, got {v!r}"
                )
        elif not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise SpecError(f"{where}: key {k!r} must be a positive int, got {v!r}")
    if model == "transformer":
        a = {**allowed, **args}
        if a["hidden"] % a["heads"]:
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
    """A GRU over tokens (embedded) or over the features of a vector, one per step."""

    def __init__(self, d_out: int, hidden: int, embed: int, p: float, vocab: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed) if vocab else None
        self.gru = nn.GRU(embed if vocab else 1, hidden, batch_first=True)
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.embed(x) if self.embed is not None else x.unsqueeze(-1)
        _, h = self.gru(self.drop(seq) if self.embed is not None else seq)
        return self.out(self.drop(h[-1]))


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
    a = {**MODEL_ARGS[model], **(args or {})}
    d_out = data.n_classes or 1
    shape = data.input_shape
    if model == "mlp":
        if data.tokens:
            raise SpecError("model 'mlp' does not take token sequences")
        return MLP(int(torch.tensor(shape).prod()), d_out, a["hidden"], dropout)
    if model == "cnn1d":
        if data.tokens:
            raise SpecError("model 'cnn1d' does not take token sequences")
        return CNN1D(shape[0], d_out, a["channels"], a["kernel"], a["hidden"], dropout)
    if model == "gru":
        return GRUClassifier(
            d_out, a["hidden"], a["embed"], dropout, vocab=data.vocab if data.tokens else 0
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
