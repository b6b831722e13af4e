"""Training checkpoints without pickle: one safetensors file per checkpoint.

Tensors (network weights, optimizer state tensors, torch RNG state as uint8) go
in the safetensors body; everything else (optimizer hyperparameters, numpy and
Python RNG states, timesteps, episodes, agent-specific JSON) goes in one JSON
string in the file's metadata. The file is written to a temporary name, fsynced
and renamed over the previous checkpoint, so a kill at any moment leaves either
the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.safetensors"
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
    os.replace(tmp, path)
    return path


def load_checkpoint(
    run_dir: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read ``run_dir/checkpoint.safetensors`` back into (tensors, meta)."""
    from safetensors import SafetensorError, safe_open

    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from e
    if header is None:
        raise CheckpointError(f"{path}: not an rlhpo checkpoint (no {_META_KEY} metadata)")
    meta = json.loads(header)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {meta.get('format_version')!r}, "
            f"this rlhpo reads {FORMAT_VERSION}"
        )
    return tensors, meta
