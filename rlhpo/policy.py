"""Policy files: a directory with ``manifest.json`` and ``policy.safetensors``.

No pickle anywhere: the weights are safetensors, everything else is JSON. A
policy records the encoder and codec versions it was trained with; loading it
with other versions is an error that says which version was found and which is
needed.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlhpo.actions import ActionCodec
from rlhpo.observation import ObservationEncoder

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "policy.safetensors"
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class PolicyFileError(ValueError):
    """A policy file is missing, malformed, of another version, or not what it claims."""


class PolicyNet(nn.Module):
    """An MLP from observation to one set of logits per action dimension.

    The layout matches a stable-baselines3 ``MlpPolicy`` actor (``policy_net`` then
    ``action_net``) so that PPO weights export into it unchanged. Optional
    observation normalisation (``obs_mean``/``obs_std``) carries a VecNormalize.
    """

    def __init__(
        self,
        obs_dim: int = ObservationEncoder.SIZE,
        nvec: tuple[int, ...] = ActionCodec.NVEC,
        hidden: tuple[int, ...] = (64, 64),
        activation: str = "tanh",
    ):
        super().__init__()
        if activation not in ("tanh", "relu"):
            raise PolicyFileError(f"activation must be tanh or relu, got {activation!r}")
        act = nn.Tanh if activation == "tanh" else nn.ReLU
        layers: list[nn.Module] = []
        d = obs_dim
        for h in hidden:
            layers += [nn.Linear(d, h), act()]
            d = h
        self.policy_net = nn.Sequential(*layers)
        self.action_net = nn.Linear(d, int(sum(nvec)))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.obs_dim, self.nvec = obs_dim, tuple(int(n) for n in nvec)
        self.hidden, self.activation = tuple(int(h) for h in hidden), activation

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = (obs - self.obs_mean) / self.obs_std
        return self.action_net(self.policy_net(x))

    def split_logits(self, logits: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(logits, list(self.nvec), dim=-1))

    def distributions(self, obs: torch.Tensor) -> list[torch.distributions.Categorical]:
        return [torch.distributions.Categorical(logits=lg) for lg in self.split_logits(self(obs))]

    @torch.no_grad()
    def act(
        self, obs: np.ndarray, deterministic: bool = True, generator: torch.Generator | None = None
    ) -> np.ndarray:
        """Action(s) for one observation or a batch of them."""
        o = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        single = o.dim() == 1
        logits = self(o.unsqueeze(0) if single else o)
        parts = []
        for lg in self.split_logits(logits):
            if deterministic:
                parts.append(lg.argmax(-1))
            else:
                parts.append(
                    torch.multinomial(torch.softmax(lg, -1), 1, generator=generator).squeeze(-1)
                )
        a = torch.stack(parts, -1).numpy().astype(np.int64)
        return a[0] if single else a

    def architecture(self) -> dict[str, Any]:
        return {
            "obs_dim": self.obs_dim,
            "nvec": list(self.nvec),
            "hidden": list(self.hidden),
            "activation": self.activation,
        }


@dataclass
class Policy:
    """A loaded policy: the network and its manifest."""

    net: PolicyNet
    manifest: dict[str, Any]
    path: Path | None = None

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        return self.net.act(obs, deterministic=deterministic)

    @property
    def freeze(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("freeze", ()))


def save_policy(path: str | os.PathLike[str], net: PolicyNet, **info: Any) -> Path:
    """Write ``net`` and a manifest (``info`` adds fields: suite, agent, timesteps, ...).

    Written to temporary names first and renamed, so an interrupted save never
    leaves a half-written policy where a good one was.
    """
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    manifest = {
        "format": "rlhpo-policy",
        "format_version": FORMAT_VERSION,
        "encoder": {
            "name": "ObservationEncoder",
            "version": ObservationEncoder.VERSION,
            "size": ObservationEncoder.SIZE,
        },
        "codec": {
            "name": "ActionCodec",
            "version": ActionCodec.VERSION,
            "nvec": list(ActionCodec.NVEC),
        },
        "knobs": ["lr", "batch_size", "dropout"],
        "architecture": net.architecture(),
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
            for k, v in tensors.items()
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **_jsonable(info),
    }
    from rlhpo import __version__

    manifest.setdefault("rlhpo_version", __version__)
    tmp_w, tmp_m = out / (WEIGHTS + ".tmp"), out / (MANIFEST + ".tmp")
    save_file(
        tensors,
        str(tmp_w),
        metadata={"format": "rlhpo-policy", "format_version": str(FORMAT_VERSION)},
    )
    tmp_m.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp_w, out / WEIGHTS)
    os.replace(tmp_m, out / MANIFEST)
    return out


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, (np.integer,)):
        return int(d)
    if isinstance(d, (np.floating, float)):
        return float(d) if math.isfinite(float(d)) else None
    if isinstance(d, Path):
        return str(d)
    return d


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a policy's manifest (format and versions), without the weights.

    ``path`` is a policy directory or the name of a shipped policy (``default``).
    """
    from rlhpo.shipped import policy_names, policy_path

    p = policy_path(path)
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(4)
        if any(head.startswith(m) for m in _PICKLE_MAGIC):
            raise PolicyFileError(
                f"{p}: refusing to load a pickle/zip file (e.g. an SB3 .zip or torch .pt); "
                f"rlhpo policies are a directory with {MANIFEST} and {WEIGHTS}"
            )
        raise PolicyFileError(
            f"{p}: a policy is a directory holding {MANIFEST} and {WEIGHTS}, not a file"
        )
    if not p.is_dir():
        raise PolicyFileError(
            f"{p}: no such policy directory, nor a shipped policy "
            f"(shipped: {', '.join(policy_names())})"
        )
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise PolicyFileError(f"{p}: missing {MANIFEST}")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PolicyFileError(f"{mpath}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != "rlhpo-policy":
        raise PolicyFileError(
            f"{mpath}: not an rlhpo policy manifest (format {m.get('format') if isinstance(m, dict) else None!r})"
        )
    checks = (
        ("format_version", m.get("format_version"), FORMAT_VERSION),
        ("encoder version", (m.get("encoder") or {}).get("version"), ObservationEncoder.VERSION),
        ("codec version", (m.get("codec") or {}).get("version"), ActionCodec.VERSION),
    )
    for what, found, need in checks:
        if found != need:
            raise PolicyFileError(
                f"{mpath}: {what} {found!r} is not supported; this rlhpo needs {need} "
                f"(retrain the policy or use the rlhpo version that wrote it: {m.get('rlhpo_version')!r})"
            )
    for key in ("architecture", "tensors"):
        if not isinstance(m.get(key), dict):
            raise PolicyFileError(f"{mpath}: missing or malformed key {key!r}")
    return m


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Load a policy directory (or a shipped policy by name, ``default``), validating
    manifest versions and every tensor's shape and dtype."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from rlhpo.shipped import policy_path

    p = policy_path(path)
    m = read_manifest(p)
    wpath = p / WEIGHTS
    if not wpath.is_file():
        raise PolicyFileError(f"{p}: missing {WEIGHTS}")
    with open(wpath, "rb") as f:
        head = f.read(4)
    if any(head.startswith(mg) for mg in _PICKLE_MAGIC):
        raise PolicyFileError(
            f"{wpath}: refusing to load a pickle/zip file; weights must be safetensors"
        )
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PolicyFileError(f"{wpath}: not a readable safetensors file ({e})") from e
    want = m["tensors"]
    if set(tensors) != set(want):
        raise PolicyFileError(
            f"{wpath}: tensors {sorted(tensors)} do not match the manifest's {sorted(want)}"
        )
    for k, t in tensors.items():
        shape, dtype = list(t.shape), str(t.dtype).replace("torch.", "")
        if shape != want[k]["shape"] or dtype != want[k]["dtype"]:
            raise PolicyFileError(
                f"{wpath}: tensor {k!r} is {dtype}{shape}, the manifest says {want[k]['dtype']}{want[k]['shape']}"
            )
    arch = m["architecture"]
    try:
        net = PolicyNet(
            obs_dim=int(arch["obs_dim"]),
            nvec=tuple(arch["nvec"]),
            hidden=tuple(arch["hidden"]),
            activation=str(arch["activation"]),
        )
        net.load_state_dict(tensors)
    except (KeyError, TypeError, RuntimeError) as e:
        raise PolicyFileError(f"{p}: weights do not fit the manifest's architecture ({e})") from e
    if tuple(net.nvec) != ActionCodec.NVEC or net.obs_dim != ObservationEncoder.SIZE:
        raise PolicyFileError(
            f"{p}: network maps {net.obs_dim} features to {list(net.nvec)}; this rlhpo needs "
            f"{ObservationEncoder.SIZE} to {list(ActionCodec.NVEC)}"
        )
    net.eval()
    return Policy(net=net, manifest=m, path=p)
