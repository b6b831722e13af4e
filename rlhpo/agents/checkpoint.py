"""Training checkpoints without pickle: one safetensors file per checkpoint.

Tensors (network weights, optimizer state tensors, torch RNG state as uint8) go
in the safetensors body; everything else (optimizer hyperparameters, numpy and
Python RNG states, timesteps, episodes, agent-specific JSON) goes in one JSON
string in the file's metadata. The file is written to a temporary name, fsynced
and renamed into place, so a kill at any moment leaves either the old or the new
checkpoint, never half of one. The checkpoint it replaces is kept as the previous
generation (``checkpoint.prev.safetensors``): a last checkpoint damaged later (a
full disk, a bad copy) costs one checkpoint interval, with a warning, instead of
the run.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.safetensors"
PREVIOUS = "checkpoint.prev.safetensors"
_META_KEY = "rlhpo_checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not one rlhpo wrote."""


def flatten_optimizer_state(
    state: dict[str, Any], prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}/state/{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}/state/"
    for name, t in tensors.items():
        if name.startswith(head):
            pid, k = name[len(head) :].split("/", 1)
            state.setdefault(int(pid), {})[k] = t
    for pid, d in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(d)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The process's torch, numpy (legacy global) and Python RNG states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    py_version, py_state, py_gauss = random.getstate()
    return {"rng/torch": torch.get_rng_state()}, {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(tensors["rng/torch"])
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


def save_checkpoint(
    run_dir: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Atomically write ``run_dir/checkpoint.safetensors`` (``meta`` must be JSON-able)."""
    from safetensors.torch import save_file

    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path, tmp = out / CHECKPOINT, out / (CHECKPOINT + ".tmp")
    body = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = json.dumps({"format_version": FORMAT_VERSION, **meta})
    save_file(body, str(tmp), metadata={_META_KEY: header})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    if path.exists():
        # Between these two renames only the previous generation exists; loading
        # falls back to it, so a kill there loses nothing either.
        os.replace(path, out / PREVIOUS)
    os.replace(tmp, path)
    return path


def has_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` holds a checkpoint of either generation."""
    return any((Path(run_dir) / name).exists() for name in (CHECKPOINT, PREVIOUS))


def load_checkpoint(
    run_dir: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the last checkpoint of ``run_dir`` back into (tensors, meta); if it is missing
    or unreadable, the previous generation, with a warning."""
    run_dir = Path(run_dir)
    last, prev = run_dir / CHECKPOINT, run_dir / PREVIOUS
    if not last.is_file() and not prev.is_file():
        raise CheckpointError(f"{last}: no checkpoint to resume from")
    try:
        return _read_checkpoint(last)
    except CheckpointError as e:
        if not prev.is_file():
            raise
        try:
            loaded = _read_checkpoint(prev)
        except CheckpointError as e_prev:
            raise CheckpointError(f"{e}; the previous one too: {e_prev}") from None
        reason = str(e) if last.exists() else f"{last} is missing"
        warnings.warn(
            f"{reason}; resuming from the previous checkpoint {prev.name} "
            f"({loaded[1].get('timesteps', '?')} timesteps)",
            RuntimeWarning,
            stacklevel=2,
        )
        return loaded


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).replace("\n", " ")
        raise CheckpointError(f"{path}: not a readable checkpoint ({msg})") from e
    if header is None:
        raise CheckpointError(f"{path}: not an rlhpo checkpoint (no {_META_KEY} metadata)")
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        meta = meta if isinstance(meta, dict) else {}
        raise CheckpointError(
            f"{path}: checkpoint format_version {meta.get('format_version')!r}, "
            f"this rlhpo reads {FORMAT_VERSION}"
        )
    return tensors, meta
