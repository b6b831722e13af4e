"""Pretrained bodies for fine-tuning tasks: pretrained once, cached on disk.

A task with a ``pretrain`` table (:class:`rlhpo.tasks.spec.TaskSpec`) fine-tunes:
its model's body (every parameter but the head, the last ``nn.Linear``) is
pretrained on the dataset's source task, and each run starts from that body with
a freshly initialised head. The body is a pure function of the suite seed and the
body's config (model, its arguments, the source data and the pretraining
settings); the cache key hashes exactly these, so two tasks with the same body
share one file.

The cache lives under ``$RLHPO_CACHE``, else ``$XDG_CACHE_HOME/rlhpo``, else
``~/.cache/rlhpo``, in ``bodies/KEY.safetensors`` (no pickle). A file is written
to a temporary name and renamed into place, so two processes pretraining the same
body at once never leave a torn file: the last rename wins, and both wrote the same
weights. A missing or unreadable file is rebuilt with a one-line warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhpo.tasks.datasets import DATASET_ARGS, DATASET_CAPS, load_data
from rlhpo.tasks.models import MODEL_ARGS, build_model
from rlhpo.tasks.spec import PRETRAIN_DATASETS, SpecError, TaskSpec, check_pretrain

log = logging.getLogger("rlhpo.pretrained")

#: Bumped when the pretraining recipe changes, so that old bodies are not reused.
FORMAT_VERSION = 1
#: Dropout while pretraining (the body's, not the fine-tuning run's knob).
PRETRAIN_DROPOUT = 0.1
#: Cap on parameters x pretraining samples: about a minute on one core (a 35k-parameter
#: residual MLP took 5 s for 200,000 samples, 7e9, on a shared 2-core machine), so that
#: a body never costs more than the issue's 2 minutes.
PRETRAIN_WORK_CAP = 1e11
_BODIES: dict[str, dict[str, torch.Tensor]] = {}


def cache_dir() -> Path:
    """Where bodies are cached: ``$RLHPO_CACHE``, ``$XDG_CACHE_HOME/rlhpo`` or ``~/.cache/rlhpo``."""
    if os.environ.get("RLHPO_CACHE"):
        return Path(os.environ["RLHPO_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rlhpo"


def source_args(spec: TaskSpec) -> dict[str, Any]:
    """The source task's dataset arguments: the target's at full relatedness, sized by
    the pretrain table, with twice the classes (at least 8): a richer source teaches
    the body more of the map than the target's few classes would."""
    args = {**DATASET_ARGS[spec.dataset], **spec.dataset_args}
    classes = min(int(DATASET_CAPS["n_classes"]), max(8, 2 * int(args["n_classes"])))
    return {
        **args,
        "n_samples": spec.pretrain["samples"],
        "relatedness": 1.0,
        "n_classes": classes,
    }


def body_config(spec: TaskSpec) -> dict[str, Any]:
    """Everything the body depends on (what the cache key hashes)."""
    model_args = {k: v[0] if isinstance(v, tuple) else v for k, v in MODEL_ARGS[spec.model].items()}
    model_args.update(spec.model_args)
    return {
        "format": FORMAT_VERSION,
        "model": spec.model,
        "model_args": model_args,
        "dataset": spec.dataset,
        "source": source_args(spec),
        "pretrain": dict(spec.pretrain),
    }


def cache_key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:24]


def head_name(model: nn.Module) -> str:
    """The name of the model's head: its last ``nn.Linear``."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise SpecError(f"model {type(model).__name__} has no nn.Linear head to replace")
    return names[-1]


def body_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers except its head's."""
    head = head_name(model) + "."
    return {
        k: v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(head)
    }


def load_body(model: nn.Module, body: dict[str, torch.Tensor], task: str) -> None:
    """Copy ``body`` into ``model``; a body that does not fit is a one-line SpecError."""
    target = body_state(model)
    missing = sorted(set(target) - set(body))
    extra = sorted(set(body) - set(target))
    if missing or extra:
        raise SpecError(
            f"task {task!r}: the pretrained body does not fit the model: keys missing "
            f"{missing[:3]}, unexpected {extra[:3]}"
        )
    for k, v in target.items():
        if tuple(body[k].shape) != tuple(v.shape):
            raise SpecError(
                f"task {task!r}: the pretrained body does not fit the model: {k} is "
                f"{tuple(body[k].shape)} in the body, {tuple(v.shape)} in the model"
            )
    model.load_state_dict(body, strict=False)


def pretrain_body(spec: TaskSpec) -> dict[str, torch.Tensor]:
    """Pretrain ``spec``'s body on its source task (no cache); deterministic from the
    pretrain table's seed. Refused before it starts when it exceeds the caps."""
    from rlhpo.trainees.trainee import Trainee

    p = check_pretrain(spec.pretrain, spec.model, spec.dataset, f"task {spec.name!r}: pretrain")
    seed = int(p["seed"])
    data = load_data(spec.dataset, source_args(spec), data_seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec.model, spec.model_args, data, dropout=PRETRAIN_DROPOUT)
    n_params = sum(t.numel() for t in model.parameters())
    work = n_params * int(p["budget_samples"])
    if work > PRETRAIN_WORK_CAP:
        raise SpecError(
            f"task {spec.name!r}: pretraining {n_params} parameters on {p['budget_samples']} "
            f"samples ({work:.2g}) exceeds the cap {PRETRAIN_WORK_CAP:.2g} parameters x samples; "
            f"lower pretrain.budget_samples or the body's size"
        )
    hp = {"lr": p["lr"], "batch_size": p["batch_size"], "dropout": PRETRAIN_DROPOUT}
    # The task's own space would clip the pretraining batch size and lr to its knobs'
    # bounds; the pretraining settings are checked against PRETRAIN_KEYS instead.
    from rlhpo.knobs import SearchSpace

    space = SearchSpace(
        {"lr": (p["lr"], p["lr"]), "batch_size": (p["batch_size"],), "dropout": (0.0, 0.5)}
    )
    run = Trainee(model, data, metric="accuracy", space=space, hp=hp, optimizer="adam", seed=seed)
    run.train(int(p["budget_samples"]))
    return body_state(model)


def cached_body(spec: TaskSpec) -> dict[str, torch.Tensor]:
    """``spec``'s pretrained body: from this process, from the disk cache, or
    pretrained now and cached (a missing or corrupt file is rebuilt with a warning)."""
    if spec.dataset not in PRETRAIN_DATASETS or not spec.pretrain:
        raise SpecError(f"task {spec.name!r} has no pretrain table")
    config = body_config(spec)
    key = cache_key(config)
    if key in _BODIES:
        return _BODIES[key]
    path = cache_dir() / "bodies" / f"{key}.safetensors"
    body = _read(path, config)
    if body is None:
        body = pretrain_body(spec)
        _write(path, body, config)
    _BODIES[key] = body
    return body


def _read(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    if not path.is_file():
        log.warning("rlhpo: pretrained body %s is not cached; pretraining it (once)", path.name)
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("config", "null")) != config:
                raise ValueError("its config does not match its key")
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except Exception as e:  # noqa: BLE001 (any unreadable file is rebuilt)
        log.warning("rlhpo: cached body %s is corrupt (%s); pretraining it again", path, e)
        return None


def _write(path: Path, body: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(body, tmp, metadata={"config": json.dumps(config, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
