"""Datasets made offline: generated (MNIST-1D, scikit-learn generators, images of
shapes, token sequences for classification and for next-token prediction) or
bundled with scikit-learn. Split once per task into train / val / test with the
task's ``data_seed``; features standardised on the train split.

Next-token datasets (``lm_*``) hold ``x`` = a sequence without its last token and
``y`` = the same sequence shifted by one, with the prompt positions set to
:data:`IGNORE_TARGET` so that only the part a model can infer is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlhpo.tasks.spec import SpecError

# Allowed dataset_args per dataset, with their defaults.
DATASET_ARGS: dict[str, dict[str, Any]] = {
    "mnist1d": {"num_samples": 5000},
    "digits": {},
    "wine": {},
    "breast_cancer": {},
    "make_classification": {
        "n_samples": 2000,
        "n_features": 20,
        "n_informative": 10,
        "n_classes": 2,
        "class_sep": 1.0,
        "flip_y": 0.01,
    },
    "make_regression": {"n_samples": 2000, "n_features": 20, "n_informative": 10, "noise": 10.0},
    "friedman1": {"n_samples": 2000, "n_features": 10, "noise": 1.0},
    "sequences": {"n_samples": 3000, "length": 24, "vocab": 16, "n_classes": 4},
    "shapes": {"n_samples": 2000, "size": 12, "noise": 0.3},
    "parity": {"n_samples": 3000, "length": 12},
    "counting": {"n_samples": 3000, "length": 24, "vocab": 12, "n_classes": 6},
    "lm_copy": {"n_samples": 3000, "length": 8, "vocab": 12},
    "lm_reverse": {"n_samples": 3000, "length": 8, "vocab": 12},
    "lm_sort": {"n_samples": 3000, "length": 8, "vocab": 12},
    "latent": {
        "n_samples": 400,
        "n_features": 32,
        "n_latent": 8,
        "n_classes": 4,
        "relatedness": 0.7,
        "noise": 0.05,
        "margin": 0.5,
        "generator": 0,
    },
}
# Datasets of token sequences labelled per sequence / per position.
TOKEN_DATASETS = ("sequences", "parity", "counting")
LM_DATASETS = ("lm_copy", "lm_reverse", "lm_sort")
# Datasets whose features are a square image (what a 2D CNN takes).
IMAGE_DATASETS = ("digits", "shapes")
# Hidden width of the random network that maps latent factors to features (`latent`).
_LATENT_WIDTH = 64
# Per-position target that the loss and the accuracy skip (CrossEntropyLoss's default).
IGNORE_TARGET = -100
# Upper bounds on dataset sizes: a suite asking for more is refused before anything
# is built (10**12 rows would otherwise end in a MemoryError or a hang).
DATASET_CAPS: dict[str, int | float] = {
    "n_samples": 20000,
    "num_samples": 20000,
    "n_features": 512,
    "n_informative": 512,
    "n_classes": 50,
    "length": 128,
    "vocab": 256,
    "size": 32,
    "noise": 1000.0,
    "class_sep": 100.0,
    "flip_y": 1.0,
    "n_latent": 64,
    "relatedness": 1.0,
    "margin": 3.0,
    "generator": 2**31 - 1,
}


def check_dataset_args(dataset: str, args: dict[str, Any], where: str) -> None:
    allowed = DATASET_ARGS[dataset]
    for k, v in args.items():
        if k not in allowed:
            raise SpecError(
                f"{where}: unknown key {k!r} for dataset {dataset!r} "
                f"(allowed: {', '.join(sorted(allowed)) or 'none'})"
            )
        want = type(allowed[k])
        if (
            not isinstance(v, (int, float))
            or isinstance(v, bool)
            or (want is int and not isinstance(v, int))
        ):
            raise SpecError(f"{where}: key {k!r} must be {want.__name__}, got {v!r}")
        if v < 0:
            raise SpecError(f"{where}: key {k!r} must be >= 0, got {v!r}")
        cap = DATASET_CAPS.get(k)
        if cap is not None and v > cap:
            raise SpecError(f"{where}: key {k!r} must be <= {cap} (the cap), got {v!r}")
    a = {**allowed, **args}
    for k in ("n_samples", "num_samples"):
        if k in a and a[k] < 100:
            raise SpecError(f"{where}: key {k!r} must be >= 100, got {a[k]!r}")
    if "vocab" in a and "n_classes" in a and a["vocab"] <= a["n_classes"] + 1:
        raise SpecError(
            f"{where}: key 'vocab' must exceed n_classes + 1, got vocab={a['vocab']}, "
            f"n_classes={a['n_classes']}"
        )
    if dataset in LM_DATASETS and a["vocab"] < 4:
        raise SpecError(f"{where}: key 'vocab' must be >= 4, got {a['vocab']!r}")
    if "length" in a and a["length"] < 2:
        raise SpecError(f"{where}: key 'length' must be >= 2, got {a['length']!r}")
    if dataset == "shapes" and a["size"] < 6:
        raise SpecError(f"{where}: key 'size' must be >= 6, got {a['size']!r}")
    if dataset == "latent" and a["n_latent"] > a["n_features"]:
        raise SpecError(
            f"{where}: key 'n_latent' must be <= n_features, got n_latent={a['n_latent']}, "
            f"n_features={a['n_features']}"
        )
    if "n_classes" in a and a["n_classes"] < 2:
        raise SpecError(f"{where}: key 'n_classes' must be >= 2, got {a['n_classes']!r}")


@dataclass
class TaskData:
    """Tensors of one task, split once. ``n_classes`` is 0 for regression."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    tokens: bool = False
    vocab: int = 0
    per_token: bool = False  # y holds a target per position (next-token prediction)

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


_CACHE: dict[tuple, TaskData] = {}


def load_data(
    dataset: str,
    args: dict[str, Any] | None = None,
    data_seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> TaskData:
    """Build (or fetch from the in-process cache) the split tensors of a dataset."""
    args = dict(args or {})
    key = (dataset, tuple(sorted(args.items())), data_seed, val_fraction, test_fraction)
    if key not in _CACHE:
        _CACHE[key] = _build(
            dataset, {**DATASET_ARGS[dataset], **args}, data_seed, val_fraction, test_fraction
        )
    return _CACHE[key]


def _build(dataset: str, a: dict[str, Any], seed: int, val_f: float, test_f: float) -> TaskData:
    rng = np.random.default_rng(seed)
    if dataset == "mnist1d":
        x, y, x_test, y_test = _mnist1d(a["num_samples"], seed)
        # mnist1d ships its own test split; val is carved from its train part.
        idx = rng.permutation(len(x))
        n_val = int(round(len(x) * val_f * 0.625))  # 4000 -> 3500 train / 500 val
        val, tr = idx[:n_val], idx[n_val:]
        return _finish(x[tr], y[tr], x[val], y[val], x_test, y_test, n_classes=10)
    if dataset == "sequences":
        x, y = _sequences(rng, a["n_samples"], a["length"], a["vocab"], a["n_classes"])
        return _split(
            rng, x, y, val_f, test_f, n_classes=a["n_classes"], tokens=True, vocab=a["vocab"]
        )
    if dataset in ("parity", "counting"):
        x, y, vocab, k = _classified_tokens(rng, dataset, a)
        return _split(rng, x, y, val_f, test_f, n_classes=k, tokens=True, vocab=vocab)
    if dataset in LM_DATASETS:
        x, y = _lm_sequences(rng, dataset, a["n_samples"], a["length"], a["vocab"])
        return _split(
            rng,
            x,
            y,
            val_f,
            test_f,
            n_classes=a["vocab"],
            tokens=True,
            vocab=a["vocab"],
            per_token=True,
        )
    if dataset == "latent":
        x, y = _latent(rng, a)
        return _split(rng, x, y, val_f, test_f, n_classes=a["n_classes"])
    if dataset == "shapes":
        x, y = _shapes(rng, a["n_samples"], a["size"], a["noise"])
        return _split(rng, x, y, val_f, test_f, n_classes=4)
    from sklearn import datasets as skd

    if dataset in ("digits", "wine", "breast_cancer"):
        loader = {
            "digits": skd.load_digits,
            "wine": skd.load_wine,
            "breast_cancer": skd.load_breast_cancer,
        }
        x, y = loader[dataset](return_X_y=True)
        return _split(rng, x, y, val_f, test_f, n_classes=int(y.max()) + 1)
    rs = int(rng.integers(2**31 - 1))
    if dataset == "make_classification":
        x, y = skd.make_classification(
            n_samples=a["n_samples"],
            n_features=a["n_features"],
            n_informative=min(a["n_informative"], a["n_features"]),
            n_redundant=0,
            n_classes=a["n_classes"],
            n_clusters_per_class=2 if a["n_classes"] <= 4 else 1,
            class_sep=a["class_sep"],
            flip_y=a["flip_y"],
            random_state=rs,
        )
        return _split(rng, x, y, val_f, test_f, n_classes=a["n_classes"])
    if dataset == "make_regression":
        x, y = skd.make_regression(
            n_samples=a["n_samples"],
            n_features=a["n_features"],
            n_informative=min(a["n_informative"], a["n_features"]),
            noise=a["noise"],
            random_state=rs,
        )
        # A mild non-linearity so that a network has something to learn beyond OLS.
        y = y + 0.3 * np.abs(y).mean() * np.tanh(x[:, 0] * x[:, 1])
        return _split(rng, x, y, val_f, test_f, n_classes=0)
    if dataset == "friedman1":
        x, y = skd.make_friedman1(
            n_samples=a["n_samples"], n_features=a["n_features"], noise=a["noise"], random_state=rs
        )
        return _split(rng, x, y, val_f, test_f, n_classes=0)
    raise SpecError(f"unknown dataset {dataset!r}")


def _mnist1d(num_samples: int, seed: int):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = 42 + int(seed)
    # make_dataset seeds numpy's global RNG; keep the caller's global state intact.
    state = np.random.get_state()
    try:
        d = make_dataset(args)  # generated offline; get_dataset() would try a download
    finally:
        np.random.set_state(state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def _sequences(rng: np.random.Generator, n: int, length: int, vocab: int, k: int):
    """Token sequences whose label is the class token that occurs most often.

    Tokens ``1..k`` are class tokens, the rest are filler. Each sequence carries
    a few of several class tokens; the most frequent one (made unique) is the label.
    """
    if vocab <= k + 1:
        raise SpecError(
            f"sequences: vocab must exceed n_classes + 1, got vocab={vocab}, n_classes={k}"
        )
    x = rng.integers(k + 1, vocab, size=(n, length))
    y = np.empty(n, dtype=np.int64)
    for i in range(n):
        counts = rng.integers(0, 4, size=k)
        top = int(rng.integers(k))
        counts[top] = counts.max() + 1
        pos = rng.permutation(length)
        j = 0
        for c in range(k):
            for _ in range(int(counts[c])):
                if j < length:
                    x[i, pos[j]] = c + 1
                    j += 1
        y[i] = top
    return x, y


def _classified_tokens(rng: np.random.Generator, dataset: str, a: dict[str, Any]):
    """Parity of a bit string, or how often the marker token 1 occurs (capped at K-1)."""
    n, length = a["n_samples"], a["length"]
    if dataset == "parity":
        x = rng.integers(0, 2, size=(n, length))
        return x, x.sum(1) % 2, 2, 2
    k, vocab = a["n_classes"], a["vocab"]
    # Counts drawn uniformly over the classes (the top class meaning "K-1 or more"),
    # so that the majority class is no shortcut.
    counts = rng.integers(0, k, size=n)
    counts = np.minimum(counts + (counts == k - 1) * rng.integers(0, 3, size=n), length)
    x = rng.integers(2, vocab, size=(n, length))
    for i in range(n):
        x[i, rng.permutation(length)[: counts[i]]] = 1
    return x, np.minimum(counts, k - 1), vocab, k


def _lm_sequences(rng: np.random.Generator, dataset: str, n: int, length: int, vocab: int):
    """``content SEP transformed(content)``; only the transformed part is scored.

    Token 0 starts a sequence, 1 separates, ``2..vocab-1`` are content.
    """
    content = rng.integers(2, vocab, size=(n, length))
    if dataset == "lm_copy":
        answer = content
    elif dataset == "lm_reverse":
        answer = content[:, ::-1]
    else:
        answer = np.sort(content, axis=1)
    seq = np.concatenate(
        [np.zeros((n, 1), np.int64), content, np.ones((n, 1), np.int64), answer], axis=1
    )
    x, y = seq[:, :-1].copy(), seq[:, 1:].copy()
    # y[:, j] is the token after x[:, j]; the answer starts after SEP at x position length+1.
    y[:, : length + 1] = IGNORE_TARGET
    return x, y


def _latent(rng: np.random.Generator, a: dict[str, Any]):
    """Vectors made from a few latent factors by a fixed random ReLU network; the
    label is the arg-max of a linear readout of the factors.

    Everything that a source task shares with its fine-tuning targets comes from the
    ``generator`` seed: the network and the source's readout. A target mixes the
    source's readout with a new one, ``r W_source + sqrt(1 - r^2) W_new`` at
    ``relatedness`` r, so r = 1 is the source task itself and r = 0 shares only the
    map (what a pretrained body has learned to undo). Samples closer than ``margin``
    to a class boundary are redrawn, so that a well-trained model can be right on
    nearly all of them and the score measures learning, not label noise. The
    samples come from ``rng`` (the task's data seed).
    """
    g = np.random.default_rng([int(a["generator"]), 0x1A7E])
    d, k, c = a["n_features"], a["n_latent"], a["n_classes"]
    w1 = g.normal(0.0, np.sqrt(2.0 / k), size=(k, _LATENT_WIDTH))
    w2 = g.normal(0.0, np.sqrt(2.0 / _LATENT_WIDTH), size=(_LATENT_WIDTH, _LATENT_WIDTH))
    w3 = g.normal(0.0, np.sqrt(1.0 / _LATENT_WIDTH), size=(_LATENT_WIDTH, d))
    # Readouts for up to the class cap; a task reads its first n_classes columns,
    # so a source with more classes than its targets shares theirs.
    w_src = np.random.default_rng([int(a["generator"]), 0x5EAD]).normal(
        size=(k, int(DATASET_CAPS["n_classes"]))
    )[:, :c]
    w_new = g.normal(0.0, 1.0, size=(k, c))
    r = float(a["relatedness"])
    w = r * w_src + np.sqrt(max(0.0, 1.0 - r * r)) * w_new
    n, kept = int(a["n_samples"]), []
    for _ in range(100):
        z = rng.normal(0.0, 1.0, size=(2 * n, k))
        top = np.sort(z @ w, axis=1)
        kept.append(z[top[:, -1] - top[:, -2] > a["margin"]])
        if sum(len(b) for b in kept) >= n:
            break
    z = np.concatenate(kept)[:n]
    if len(z) < n:
        raise SpecError(f"latent: margin {a['margin']!r} leaves too few samples; lower it")
    h = np.maximum(np.maximum(z @ w1, 0.0) @ w2, 0.0) @ w3
    x = h + a["noise"] * h.std() * rng.normal(size=h.shape)
    return x, (z @ w).argmax(1)


def _shapes(rng: np.random.Generator, n: int, size: int, noise: float):
    """Noisy ``size`` x ``size`` images of one of four shapes at a random place:
    a horizontal bar, a vertical bar, a square outline, a diagonal."""
    img = rng.normal(0.0, noise, size=(n, size, size))
    y = rng.integers(0, 4, size=n)
    span = max(3, size // 2)
    for i in range(n):
        r, c = rng.integers(0, size - span + 1, size=2)
        if y[i] == 0:
            img[i, r + span // 2, c : c + span] += 1.0
        elif y[i] == 1:
            img[i, r : r + span, c + span // 2] += 1.0
        elif y[i] == 2:
            img[i, r, c : c + span] += 1.0
            img[i, r + span - 1, c : c + span] += 1.0
            img[i, r : r + span, c] += 1.0
            img[i, r : r + span, c + span - 1] += 1.0
        else:
            d = np.arange(span)
            img[i, r + d, c + d] += 1.0
    return img.reshape(n, size * size), y


def _split(rng, x, y, val_f, test_f, n_classes, tokens=False, vocab=0, per_token=False) -> TaskData:
    idx = rng.permutation(len(x))
    n_test = int(round(len(x) * test_f))
    n_val = int(round(len(x) * val_f))
    te, va, tr = idx[:n_test], idx[n_test : n_test + n_val], idx[n_test + n_val :]
    return _finish(x[tr], y[tr], x[va], y[va], x[te], y[te], n_classes, tokens, vocab, per_token)


def _finish(
    xtr, ytr, xva, yva, xte, yte, n_classes, tokens=False, vocab=0, per_token=False
) -> TaskData:
    if tokens:
        conv_x = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    else:
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-8
        conv_x = lambda a: torch.as_tensor((np.asarray(a) - mu) / sd, dtype=torch.float32)  # noqa: E731
    if n_classes:
        conv_y = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    else:
        ym, ys = ytr.mean(), ytr.std() + 1e-8
        conv_y = lambda a: torch.as_tensor((np.asarray(a) - ym) / ys, dtype=torch.float32)  # noqa: E731
    return TaskData(
        conv_x(xtr),
        conv_y(ytr),
        conv_x(xva),
        conv_y(yva),
        conv_x(xte),
        conv_y(yte),
        n_classes=n_classes,
        tokens=tokens,
        vocab=vocab,
        per_token=per_token,
    )
