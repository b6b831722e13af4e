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

from rlhpo.actions import ActionCodec, nvec_of
from rlhpo.knobs import KNOBS, KnobError, order_knobs
from rlhpo.observation import ENCODERS, ObservationEncoder, encoder_class

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

    ``window`` and ``hold``: the net acts only while the budget fraction used
    (observation feature 0) lies in ``[window[0], window[1]]``; elsewhere :meth:`act`
    returns ``hold`` (the "keep" action). A policy learned from states of part of the
    run only (the vine's branch points) has never seen the rest, and what it does there
    is extrapolation: outside its data's support it stays the prior.
    """

    def __init__(
        self,
        obs_dim: int = ObservationEncoder.SIZE,
        nvec: tuple[int, ...] = ActionCodec.NVEC,
        hidden: tuple[int, ...] = (64, 64),
        activation: str = "tanh",
        window: tuple[float, float] | None = None,
        hold: tuple[int, ...] | None = None,
    ):
        super().__init__()
        if activation not in ("tanh", "relu"):
            raise PolicyFileError(f"activation must be tanh or relu, got {activation!r}")
        check_window(window, hold, nvec)
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
        self.window = None if window is None else (float(window[0]), float(window[1]))
        self.hold = None if hold is None else tuple(int(k) for k in hold)

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
        batch = o.unsqueeze(0) if single else o
        logits = self(batch)
        parts = []
        for lg in self.split_logits(logits):
            if deterministic:
                parts.append(lg.argmax(-1))
            else:
                parts.append(
                    torch.multinomial(torch.softmax(lg, -1), 1, generator=generator).squeeze(-1)
                )
        a = torch.stack(parts, -1).numpy().astype(np.int64)
        if self.window is not None:
            frac = batch[:, 0].numpy()
            out = (frac < self.window[0]) | (frac > self.window[1])
            a[out] = np.asarray(self.hold, dtype=np.int64)
        return a[0] if single else a

    def architecture(self) -> dict[str, Any]:
        arch: dict[str, Any] = {
            "obs_dim": self.obs_dim,
            "nvec": list(self.nvec),
            "hidden": list(self.hidden),
            "activation": self.activation,
        }
        if self.window is not None:
            arch |= {"window": list(self.window), "hold": list(self.hold or ())}
        return arch


def check_window(window: Any, hold: Any, nvec: tuple[int, ...]) -> None:
    """Raise :class:`PolicyFileError` unless ``window`` is None (and ``hold`` too) or
    ``[lo, hi]`` with 0 <= lo <= hi <= 1 and ``hold`` one valid action per dimension."""
    if window is None and hold is None:
        return
    ok = (
        isinstance(window, (list, tuple))
        and len(window) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in window)
        and 0 <= window[0] <= window[1] <= 1
    )
    if not ok:
        raise PolicyFileError(
            f"architecture.window must be [lo, hi] with 0 <= lo <= hi <= 1, got {_short(window)}"
        )
    check_hold(hold, nvec)


def check_hold(hold: Any, nvec: tuple[int, ...]) -> None:
    """Raise :class:`PolicyFileError` unless ``hold`` is one valid action per dimension."""
    ok = (
        isinstance(hold, (list, tuple))
        and len(hold) == len(nvec)
        and all(_is_int(k) and 0 <= k < n for k, n in zip(hold, nvec, strict=False))
    )
    if not ok:
        raise PolicyFileError(
            f"architecture.hold must be one action per dimension of {list(nvec)}, "
            f"got {_short(hold)}"
        )


MAX_MEMBERS = 8


def check_members(k: Any) -> None:
    """Raise :class:`PolicyFileError` unless ``k`` is a number of consensus members."""
    if not _is_int(k) or not 2 <= k <= MAX_MEMBERS:
        raise PolicyFileError(f"architecture.members must be 2 to {MAX_MEMBERS}, got {_short(k)}")


class ConsensusNet(nn.Module):
    """An ensemble of :class:`PolicyNet` members that acts only where they agree.

    Where at least ``quorum`` members (default: all of them; more than half) pick the
    same action, that action; elsewhere ``hold`` (the "keep" action). Members fitted on
    bootstrap resamples of the same branch data agree where the data decide and
    disagree where a net extrapolates, so the ensemble keeps
    the prior exactly where one net's move would be a guess (pessimism under
    uncertainty, as in ensemble-based offline RL). ``window`` limits it to a span of
    the budget, as :class:`PolicyNet`'s does. The members are stored as
    ``members.{j}.*`` tensors; the architecture records ``members`` (their number)
    and, when it is not all of them, ``quorum``.
    """

    def __init__(
        self,
        members: list[PolicyNet],
        hold: tuple[int, ...],
        window: tuple[float, float] | None = None,
        quorum: int | None = None,
    ):
        super().__init__()
        check_members(len(members))
        first = members[0].architecture()
        for m in members:
            if m.window is not None or m.architecture() != first:
                raise PolicyFileError(
                    "a consensus needs members of one architecture without their own window"
                )
        check_hold(hold, members[0].nvec)
        if window is not None:
            check_window(window, hold, members[0].nvec)
        check_quorum(quorum, len(members))
        self.quorum = len(members) if quorum is None else int(quorum)
        self.members = nn.ModuleList(members)
        self.obs_dim, self.nvec = members[0].obs_dim, members[0].nvec
        self.hold = tuple(int(k) for k in hold)
        self.window = None if window is None else (float(window[0]), float(window[1]))
        self._slots: list[tuple[nn.Module, str]] = []
        self._stack_key: tuple = ()
        self._stack: tuple = ()

    def _stacked(self) -> tuple:
        """The members' buffers and layers stacked along a first axis of size K (rebuilt
        whenever a tensor was replaced or changed in place), for one batched pass."""
        ms = list(self.members)
        layers = [i for i, mod in enumerate(ms[0].policy_net) if isinstance(mod, nn.Linear)]
        if not self._slots:  # (module, tensor name): the structure is fixed, the tensors not
            for m in ms:
                self._slots += [(m, "obs_mean"), (m, "obs_std"), (m.action_net, "weight")]
                self._slots += [(m.action_net, "bias")]
                self._slots += [(m.policy_net[i], n) for i in layers for n in ("weight", "bias")]
        key = tuple((id(x), x._version) for x in (getattr(mod, n) for mod, n in self._slots))
        if key != self._stack_key:

            def stack(get):
                return torch.stack([get(m).detach() for m in ms])

            hidden = [
                (
                    stack(lambda m, i=i: m.policy_net[i].weight).transpose(1, 2),
                    stack(lambda m, i=i: m.policy_net[i].bias).unsqueeze(1),
                )
                for i in layers
            ]
            self._stack = (
                stack(lambda m: m.obs_mean).unsqueeze(1),
                stack(lambda m: m.obs_std).unsqueeze(1),
                hidden,
                stack(lambda m: m.action_net.weight).transpose(1, 2),
                stack(lambda m: m.action_net.bias).unsqueeze(1),
            )
            self._stack_key = key
        return self._stack

    def _member_actions(self, batch: np.ndarray) -> np.ndarray:
        """Every member's greedy action, ``[K, B, len(nvec)]``, in one batched pass."""
        mean, std, hidden, w_out, b_out = self._stacked()
        f = torch.tanh if self.members[0].activation == "tanh" else torch.relu
        x = (torch.as_tensor(batch).unsqueeze(0) - mean) / std
        for w, b in hidden:
            x = f(torch.baddbmm(b, x, w))
        logits = torch.baddbmm(b_out, x, w_out)
        parts = [lg.argmax(-1) for lg in torch.split(logits, list(self.nvec), dim=-1)]
        return torch.stack(parts, -1).numpy().astype(np.int64)

    @torch.no_grad()
    def act(
        self, obs: np.ndarray, deterministic: bool = True, generator: torch.Generator | None = None
    ) -> np.ndarray:
        """Action(s) for one observation or a batch: the members' common action, else hold."""
        o = np.asarray(obs, dtype=np.float32)
        single = o.ndim == 1
        batch = o[None] if single else o
        if deterministic:
            acts = self._member_actions(batch)
        else:
            acts = np.stack([m.act(batch, deterministic, generator) for m in self.members])
        hold = np.asarray(self.hold, dtype=np.int64)
        out = np.tile(hold, (len(batch), 1))
        for j in range(len(self.members) - self.quorum + 1):  # a quorum includes one of these
            votes = (acts == acts[j]).all(-1).sum(0)  # members that pick member j's action
            win = votes >= self.quorum
            out[win] = acts[j][win]
        if self.window is not None:
            off = (batch[:, 0] < self.window[0]) | (batch[:, 0] > self.window[1])
            out[off] = hold
        return out[0] if single else out

    def architecture(self) -> dict[str, Any]:
        arch = self.members[0].architecture() | {
            "members": len(self.members),
            "hold": list(self.hold),
        }
        if self.quorum != len(self.members):
            arch["quorum"] = self.quorum
        if self.window is not None:
            arch["window"] = list(self.window)
        return arch


def build_net(arch: dict[str, Any]) -> PolicyNet | ConsensusNet:
    """An untrained net of a policy-file architecture checked by :func:`validate_manifest`
    (or made by a net's ``architecture()``): one :class:`PolicyNet`, or a
    :class:`ConsensusNet` of ``members`` of them."""
    one = {
        "obs_dim": int(arch["obs_dim"]),
        "nvec": tuple(arch["nvec"]),
        "hidden": tuple(arch["hidden"]),
        "activation": str(arch["activation"]),
    }
    if arch.get("members") is None:
        return PolicyNet(**one, window=arch.get("window"), hold=arch.get("hold"))
    return ConsensusNet(
        [PolicyNet(**one) for _ in range(arch["members"])],
        hold=arch.get("hold"),
        window=arch.get("window"),
        quorum=arch.get("quorum"),
    )


def check_quorum(quorum: Any, members: int) -> None:
    """Raise :class:`PolicyFileError` unless ``quorum`` is None (all members) or an int
    above half of ``members`` and at most all of them (so at most one action wins)."""
    if quorum is None:
        return
    if not _is_int(quorum) or not members // 2 < quorum <= members:
        raise PolicyFileError(
            f"architecture.quorum must be more than half of the {members} members and at "
            f"most all of them, got {_short(quorum)}"
        )


@dataclass
class Policy:
    """A loaded policy: the network and its manifest."""

    net: PolicyNet | ConsensusNet
    manifest: dict[str, Any]
    path: Path | None = None

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        return self.net.act(obs, deterministic=deterministic)

    @property
    def obs_version(self) -> int:
        """The observation encoder version the policy was trained with."""
        return int(self.manifest["encoder"]["version"])

    @property
    def base_schedule(self):
        """The schedule a residual policy moves a level over (None: the policy sets
        the lr itself); see :mod:`rlhpo.residual`."""
        from rlhpo.residual import BaseSchedule

        raw = (self.manifest.get("env") or {}).get("base_schedule")
        return None if raw is None else BaseSchedule.from_json(raw)

    @property
    def guard(self) -> bool:
        """Whether the do-no-harm guard runs with this policy by default (the manifest's
        ``guard``; policy files that do not say get it)."""
        return bool(self.manifest.get("guard", True))

    @property
    def collapse_k(self) -> float | None:
        """The collapse guard's ``k`` the policy was trained with (None: trained without)."""
        k = (self.manifest.get("env") or {}).get("collapse_k")
        return None if k is None else float(k)

    def env_overrides(self) -> dict[str, Any]:
        """The :class:`rlhpo.env.EnvConfig` fields that make an env act as the one the
        policy was trained in (observation encoder, base schedule)."""
        base = self.base_schedule
        return {"obs_version": self.obs_version, "base_schedule": base}

    @property
    def freeze(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("freeze", ()))

    @property
    def knobs(self) -> tuple[str, ...]:
        """The knobs the policy's actions move (the manifest names them)."""
        return order_knobs(self.manifest.get("knobs", KNOBS))


def save_policy(
    path: str | os.PathLike[str],
    net: PolicyNet | ConsensusNet,
    *,
    knobs: Any = KNOBS,
    obs_version: int = ObservationEncoder.VERSION,
    **info: Any,
) -> Path:
    """Write ``net`` and a manifest (``info`` adds fields: suite, agent, timesteps, ...).

    ``knobs`` are the knobs the net's actions move (the env's ``knobs``);
    ``obs_version`` the observation encoder it was trained with (the env's).

    Written to temporary names first and renamed, so an interrupted save never
    leaves a half-written policy where a good one was.
    """
    from safetensors.torch import save_file

    knobs = order_knobs(knobs)
    encoder = encoder_class(obs_version)
    if net.obs_dim != encoder.size_for(knobs):
        raise ValueError(
            f"the network reads {net.obs_dim} features; observation encoder v{obs_version} "
            f"gives {encoder.size_for(knobs)} for the knobs {list(knobs)}"
        )
    if tuple(net.nvec) != nvec_of(knobs):
        raise ValueError(
            f"the network's actions {list(net.nvec)} do not fit the knobs {list(knobs)} "
            f"({list(nvec_of(knobs))})"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    manifest = {
        "format": "rlhpo-policy",
        "format_version": FORMAT_VERSION,
        "encoder": {
            "name": "ObservationEncoder",
            "version": encoder.VERSION,
            "size": encoder.size_for(knobs),
        },
        "codec": {
            "name": "ActionCodec",
            "version": ActionCodec.VERSION,
            "nvec": list(nvec_of(knobs)),
        },
        "knobs": list(knobs),
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


# Policy files may come from anywhere: every limit below is checked before a tensor is
# allocated or a field is used, so a hostile or corrupt file fails with one line
# instead of a traceback, a hang or a multi-GB allocation. The shipped policies
# use a few KB, 2 hidden layers of 64 and under 10,000 weights.
MAX_MANIFEST_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_HIDDEN_LAYERS = 8
MAX_WIDTH = 4096
MAX_TENSORS = 64
MAX_WEIGHT_VALUES = 1 << 24
_DTYPES = ("float32", "float64", "float16", "bfloat16")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (the value may be hostile)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            return d
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v: Any) -> str:
    text = repr(v) if not isinstance(v, (dict, list)) or _depth(v) <= MAX_DEPTH else "(deep)"
    return text if len(text) <= 60 else text[:57] + "..."


def _int_list(where: str, v: Any, lo: int, hi: int, max_len: int, min_len: int = 0) -> list[int]:
    if not isinstance(v, list) or not min_len <= len(v) <= max_len:
        raise PolicyFileError(
            f"{where} must be a list of {min_len} to {max_len} integers, got {_short(v)}"
        )
    for x in v:
        if not _is_int(x) or not lo <= x <= hi:
            raise PolicyFileError(
                f"{where} entries must be integers in [{lo}, {hi}], got {_short(x)}"
            )
    return v


def validate_manifest(m: Any, where: str = MANIFEST) -> dict[str, Any]:
    """Check a parsed manifest against the policy-file schema (types, sizes, nesting,
    architecture caps); raise :class:`PolicyFileError` naming the first bad field."""
    if not isinstance(m, dict) or m.get("format") != "rlhpo-policy":
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise PolicyFileError(f"{where}: not an rlhpo policy manifest (format {_short(found)})")
    if _depth(m) > MAX_DEPTH:
        raise PolicyFileError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    for key in ("encoder", "codec", "architecture", "tensors"):
        if not isinstance(m.get(key), dict):
            raise PolicyFileError(f"{where}: {key!r} must be an object, got {_short(m.get(key))}")
    checks = (
        ("format_version", m.get("format_version"), FORMAT_VERSION),
        ("codec version", m["codec"].get("version"), ActionCodec.VERSION),
    )
    for what, found, need in checks:
        if not _is_int(found) or found != need:
            raise PolicyFileError(
                f"{where}: {what} {_short(found)} is not supported; this rlhpo needs {need} "
                f"(retrain the policy or use the rlhpo version that wrote it: "
                f"{_short(m.get('rlhpo_version'))})"
            )
    version = m["encoder"].get("version")
    if not _is_int(version) or version not in ENCODERS:
        have = ", ".join(f"v{v}" for v in ENCODERS)
        raise PolicyFileError(
            f"{where}: the policy needs observation encoder v{_short(version)}, which this "
            f"rlhpo lacks (it has {have}; use the rlhpo version that wrote it: "
            f"{_short(m.get('rlhpo_version'))})"
        )
    encoder = encoder_class(version)
    knobs = m.get("knobs", ["lr", "batch_size", "dropout"])
    if isinstance(knobs, list):  # names, or objects with a name and more (bounds, ...)
        knobs = [k.get("name") if isinstance(k, dict) else k for k in knobs]
    if not isinstance(knobs, list) or not all(isinstance(k, str) for k in knobs):
        raise PolicyFileError(
            f"{where}: knobs must be a list of knob names, got {_short(m.get('knobs'))}"
        )
    if len(knobs) > 16:
        raise PolicyFileError(f"{where}: knobs must list at most 16 knobs, got {len(knobs)}")
    try:  # the sizes below follow from the knobs the policy moves (opt-in knobs add some)
        names = order_knobs(knobs)
    except KnobError as e:
        raise PolicyFileError(f"{where}: knobs: {e}") from e
    obs_dim, want_nvec = encoder.size_for(names), list(nvec_of(names))
    arch = m["architecture"]
    if not _is_int(arch.get("obs_dim")) or arch["obs_dim"] != obs_dim:
        raise PolicyFileError(
            f"{where}: architecture.obs_dim must be {obs_dim} for observation encoder "
            f"v{version} and the knobs {list(names)}, got {_short(arch.get('obs_dim'))}"
        )
    nvec = _int_list(f"{where}: architecture.nvec", arch.get("nvec"), 1, 256, 16, 1)
    if nvec != want_nvec:
        raise PolicyFileError(
            f"{where}: architecture.nvec must be {want_nvec} for the knobs {list(names)}, "
            f"got {nvec}"
        )
    _int_list(f"{where}: architecture.hidden", arch.get("hidden"), 1, MAX_WIDTH, MAX_HIDDEN_LAYERS)
    if arch.get("activation") not in ("tanh", "relu"):
        raise PolicyFileError(
            f"{where}: architecture.activation must be tanh or relu, "
            f"got {_short(arch.get('activation'))}"
        )
    try:
        if arch.get("members") is None:
            check_window(arch.get("window"), arch.get("hold"), tuple(nvec))
        else:
            check_members(arch["members"])
            check_hold(arch.get("hold"), tuple(nvec))
            check_quorum(arch.get("quorum"), arch["members"])
            if arch.get("window") is not None:
                check_window(arch["window"], arch.get("hold"), tuple(nvec))
    except PolicyFileError as e:
        raise PolicyFileError(f"{where}: {e}") from None
    tensors = m["tensors"]
    if not 1 <= len(tensors) <= MAX_TENSORS:
        raise PolicyFileError(
            f"{where}: tensors must list 1 to {MAX_TENSORS} tensors, got {len(tensors)}"
        )
    for name, t in tensors.items():
        if not isinstance(t, dict) or set(t) != {"shape", "dtype"}:
            raise PolicyFileError(
                f"{where}: tensors[{_short(name)}] must be an object with shape and dtype, "
                f"got {_short(t)}"
            )
        _int_list(f"{where}: tensors[{_short(name)}].shape", t["shape"], 0, MAX_WEIGHT_VALUES, 4)
        if t["dtype"] not in _DTYPES:
            raise PolicyFileError(
                f"{where}: tensors[{_short(name)}].dtype must be one of {', '.join(_DTYPES)}, "
                f"got {_short(t['dtype'])}"
            )
    freeze = m.get("freeze", [])
    if not isinstance(freeze, list) or not all(isinstance(k, str) and k in knobs for k in freeze):
        raise PolicyFileError(
            f"{where}: freeze must be a list of knob names from {knobs}, got {_short(freeze)}"
        )
    env = m.get("env", {})
    if not isinstance(env, dict):
        raise PolicyFileError(f"{where}: env must be an object, got {_short(env)}")
    if env.get("base_schedule") is not None:
        from rlhpo.residual import BaseSchedule, BaseScheduleError

        try:
            BaseSchedule.from_json(env["base_schedule"])
        except BaseScheduleError as e:
            raise PolicyFileError(f"{where}: env.{e}") from None
    if not isinstance(m.get("guard", True), bool):
        raise PolicyFileError(f"{where}: guard must be true or false, got {_short(m.get('guard'))}")
    k = env.get("collapse_k")
    if k is not None and not (
        isinstance(k, (int, float)) and not isinstance(k, bool) and 0 < k < 1e6
    ):
        raise PolicyFileError(
            f"{where}: env.collapse_k must be a number > 0 or null, got {_short(k)}"
        )
    return m


def architecture_shapes(arch: dict[str, Any]) -> dict[str, list[int]]:
    """The tensor shapes a net of this architecture holds (nothing allocated): a
    :class:`PolicyNet`'s, or each ``members.{j}.`` of a :class:`ConsensusNet`."""
    if arch.get("members") is not None:
        one = architecture_shapes({k: v for k, v in arch.items() if k != "members"})
        return {f"members.{j}.{k}": v for j in range(arch["members"]) for k, v in one.items()}
    d = arch["obs_dim"]
    shapes: dict[str, list[int]] = {"obs_mean": [d], "obs_std": [d]}
    for i, h in enumerate(arch["hidden"]):
        # nn.Sequential numbers activations too: the Linear layers are 0, 2, 4, ...
        shapes[f"policy_net.{2 * i}.weight"] = [h, d]
        shapes[f"policy_net.{2 * i}.bias"] = [h]
        d = h
    shapes["action_net.weight"] = [sum(arch["nvec"]), d]
    shapes["action_net.bias"] = [sum(arch["nvec"])]
    return shapes


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a policy's manifest (schema, format and versions), without the weights.

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
    with open(mpath, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise PolicyFileError(f"{mpath}: larger than the {MAX_MANIFEST_BYTES} bytes allowed")
    try:
        m = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PolicyFileError(f"{mpath}: not valid JSON ({e})") from e
    except RecursionError:
        raise PolicyFileError(f"{mpath}: JSON nested deeper than {MAX_DEPTH} levels") from None
    return validate_manifest(m, str(mpath))


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Load a policy directory (or a shipped policy by name, ``default``). The manifest is
    checked first, then every tensor's name, shape and dtype in the weights file's
    header, before any tensor is allocated."""
    from safetensors import SafetensorError, safe_open

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
    want, arch = m["tensors"], m["architecture"]
    shapes = architecture_shapes(arch)
    if set(shapes) != set(want):
        raise PolicyFileError(
            f"{p}: the manifest's tensors {sorted(want)} do not fit its architecture "
            f"(hidden {arch['hidden']}), which holds {sorted(shapes)}"
        )
    for k, shape in shapes.items():
        if want[k]["shape"] != shape:
            raise PolicyFileError(
                f"{p}: tensor {k!r} is {shape} in the manifest's architecture (hidden "
                f"{arch['hidden']}), the manifest says {want[k]['shape']}"
            )
    values = sum(math.prod(s) for s in shapes.values())
    if values > MAX_WEIGHT_VALUES:
        raise PolicyFileError(
            f"{p}: the architecture holds {values} weights, more than the {MAX_WEIGHT_VALUES} "
            "allowed"
        )
    try:
        with safe_open(str(wpath), framework="pt") as f:
            found = set(f.keys())
            if found != set(want):
                raise PolicyFileError(
                    f"{wpath}: tensors {sorted(found)} do not match the manifest's {sorted(want)}"
                )
            for k in sorted(found):
                sl = f.get_slice(k)
                shape, dtype = list(sl.get_shape()), _dtype_name(sl.get_dtype())
                if shape != want[k]["shape"] or dtype != want[k]["dtype"]:
                    raise PolicyFileError(
                        f"{wpath}: tensor {k!r} is {dtype}{shape}, the manifest says "
                        f"{want[k]['dtype']}{want[k]['shape']}"
                    )
            tensors = {k: f.get_tensor(k) for k in found}
    except PolicyFileError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).replace("\n", " ")
        raise PolicyFileError(f"{wpath}: not a readable safetensors file ({msg})") from e
    try:
        # The initialisation is overwritten by the weights: draw it off the global RNG.
        with torch.random.fork_rng(devices=[]):
            net = build_net(arch)
        net.load_state_dict(tensors)
    except (KeyError, TypeError, RuntimeError) as e:
        raise PolicyFileError(f"{p}: weights do not fit the manifest's architecture ({e})") from e
    try:
        knobs = order_knobs(m.get("knobs", KNOBS))
    except KnobError as e:
        raise PolicyFileError(f"{p}: manifest 'knobs': {e}") from e
    want_obs = encoder_class(m["encoder"]["version"]).size_for(knobs)
    want_nvec = nvec_of(knobs)
    if tuple(net.nvec) != want_nvec or net.obs_dim != want_obs:
        raise PolicyFileError(
            f"{p}: network maps {net.obs_dim} features to {list(net.nvec)}; its knobs "
            f"{list(knobs)} need {want_obs} to {list(want_nvec)}"
        )
    net.eval()
    return Policy(net=net, manifest=m, path=p)


def _dtype_name(safetensors_dtype: str) -> str:
    """safetensors' header names (F32, BF16, ...) as torch's (float32, bfloat16, ...)."""
    names = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16"}
    return names.get(safetensors_dtype, safetensors_dtype.lower())
