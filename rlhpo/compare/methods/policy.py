"""A saved policy tuning a run through HPOEnv (the encoder and codec it was trained with)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rlhpo.compare.methods._base import CellRun, Method, MethodError, MethodText
from rlhpo.compare.methods._cell import Cell, start_hp
from rlhpo.knobs import KnobError, check_knob
from rlhpo.tasks.spec import TaskSpec

_POLICIES: dict[str, Any] = {}


def _policy(path: str):
    from rlhpo.policy import load_policy
    from rlhpo.shipped import policy_path

    key = str(policy_path(path).resolve())
    if key not in _POLICIES:
        _POLICIES[key] = load_policy(key)
    return _POLICIES[key]


@dataclass(frozen=True)
class PolicyMethod(Method):
    """``policy:DIR`` or ``policy:NAME`` (a shipped policy, e.g. ``policy:default``);
    ``?freeze=batch_size,dropout`` keeps those knobs at their start values;
    ``?guard=on|off`` runs with or without the do-no-harm guard (default: as the
    policy file says, on for files that do not say; ``k`` as the policy was trained
    with, else :data:`rlhpo.safety.COLLAPSE_K`);
    ``?base_peak=user&peak_factor=F`` starts a residual policy's level at the start's
    lr x F instead of its tuned peak (:class:`rlhpo.residual.BaseSchedule`)."""

    policy_dir: str | None = None
    freeze: tuple[str, ...] = ()
    guard: bool | None = None
    base_peak: str | None = None
    peak_factor: float | None = None

    kind: ClassVar[str] = "policy"
    syntax: ClassVar[str] = (
        "policy:DIR|NAME[?freeze=KNOB,...][&guard=off][&base_peak=user&peak_factor=F]"
    )
    options: ClassVar[frozenset[str]] = frozenset({"freeze", "guard", "base_peak", "peak_factor"})
    takes_arg: ClassVar[bool] = True

    @classmethod
    def accepts(cls, base: str) -> bool:
        return base == "policy"

    @classmethod
    def parse(cls, text: MethodText) -> PolicyMethod:
        if not text.arg:
            raise text.error("policy needs a directory: policy:DIR")
        spec = text.params.get("freeze", "")
        freeze = tuple(k.strip() for k in re.split(r"[,+]", spec) if k.strip())
        for k in freeze:
            try:
                check_knob(k)
            except KnobError as e:
                raise text.error(f"freeze: {e}") from None
        guard_text = text.params.get("guard")
        if guard_text not in (None, "on", "off"):
            raise text.error(f"guard must be on or off, got {guard_text!r}")
        label = text.name or "policy:" + (Path(text.arg).name or text.arg)
        if freeze and not text.name:
            label += "-freeze-" + "+".join(freeze)
        if guard_text == "off" and not text.name:
            label += "-noguard"
        guard = None if guard_text is None else guard_text == "on"
        base_peak = text.params.get("base_peak")
        factor = text.positive_float("peak_factor")
        if base_peak is not None or factor is not None:
            from rlhpo.residual import BaseSchedule, BaseScheduleError

            try:  # the same checks as the schedule's, before any cell runs
                base_peak = BaseSchedule((("adam", 1.0),)).with_peak(base_peak, factor).base_peak
            except BaseScheduleError as e:
                raise text.error(str(e)) from None
            if not text.name:
                label += f"-{base_peak}-peak" + (f"-x{factor:g}" if factor is not None else "")
        return cls(
            text.raw,
            label,
            policy_dir=text.arg,
            freeze=freeze,
            guard=guard,
            base_peak=base_peak,
            peak_factor=factor,
        )

    def resolve(self, suite_name: str, specs: list[TaskSpec]) -> PolicyMethod:
        from rlhpo.policy import PolicyFileError, load_policy

        try:  # the whole file, weights included: a broken one fails before any cell runs
            policy = load_policy(self.policy_dir)
        except PolicyFileError as e:
            raise MethodError(f"method {self.raw!r}: {e}") from None
        if self.base_peak is not None and policy.base_schedule is None:
            raise MethodError(
                f"method {self.raw!r}: base_peak needs a policy trained over a base schedule; "
                f"{self.policy_dir} has none"
            )
        return self

    def setup(self) -> dict[str, Any]:
        # Where the policy lives may change (the shipped ones moved into the package);
        # its weights are compared through fingerprint() instead.
        out: dict[str, Any] = {"freeze": self.freeze, "guard": self.guard}
        if self.base_peak is not None:  # only when set: older folders resume as they were
            out.update(base_peak=self.base_peak, peak_factor=self.peak_factor)
        return out

    def fingerprint(self) -> str:
        """sha256 of the weights file: a resumed comparison must not mix two policies
        under one method name."""
        import hashlib

        from rlhpo.policy import WEIGHTS
        from rlhpo.shipped import policy_path

        return hashlib.sha256(
            (policy_path(str(self.policy_dir)) / WEIGHTS).read_bytes()
        ).hexdigest()

    def load(self):
        """The policy (anything with ``act``, ``freeze``, ``guard``, ``collapse_k`` and
        ``env_overrides``, as :class:`rlhpo.policy.Policy`)."""
        return _policy(str(self.policy_dir))

    def run(self, cell: Cell) -> CellRun:
        """A policy run through HPOEnv, deterministic actions, same seed as the baselines."""
        from rlhpo.baselines.single import RunOutcome, preload
        from rlhpo.env import HPOEnv
        from rlhpo.observation import normalised_score
        from rlhpo.tasks.spec import Suite

        spec = cell.spec
        policy = self.load()
        suite = Suite(name=cell.suite_name, tasks={spec.name: spec}, train=(spec.name,), test=())
        freeze = tuple(sorted(set(self.freeze) | set(policy.freeze)))
        from rlhpo.safety import COLLAPSE_K

        guard = policy.guard if self.guard is None else self.guard
        k = (policy.collapse_k or COLLAPSE_K) if guard else None
        overrides = policy.env_overrides()
        if self.base_peak is not None:
            overrides["base_schedule"] = overrides["base_schedule"].with_peak(
                self.base_peak, self.peak_factor
            )
        # rollback: what the Controller does in a user's loop (a divergence goes back to
        # the last good state at a quarter of the lr); a run ends only at its budget.
        env = HPOEnv(
            suite,
            split="train",
            freeze=freeze,
            timing=True,
            collapse_k=k,
            rollback=True,
            **overrides,
        )
        preload(spec)
        hp = start_hp(spec, cell.start)
        t0 = time.perf_counter()
        obs, info = env.reset(seed=cell.seed, options={"task": spec.name, "hp": hp})
        trace = [_env_row(info, t0)]
        done, collapses, rollbacks, moves, decisions = False, 0, 0, 0, 0
        while not done:
            action = policy.act(obs)
            if "rollback" not in info:  # after a rollback no decision is made (as the Controller)
                moves += tuple(int(v) for v in action) != tuple(env.codec.noop)
                decisions += 1
            obs, _, term, trunc, info = env.step(action)
            trace.append(_env_row(info, t0))
            collapses += "collapse" in info
            rollbacks += "rollback" in info
            done = term or trunc
        wall = time.perf_counter() - t0
        train_time = env.trainee.wall_time
        test = env.test_score()["score"]
        n_classes = env.trainee.data.n_classes
        diverged = bool(info["diverged"])
        out = RunOutcome(
            val_score=info["val_score"],
            val_norm=info["val_norm_score"],
            test_score=test,
            test_norm=0.0 if diverged else normalised_score(spec.metric, test, n_classes),
            samples=info["samples"],
            optimizer_steps=info["optimizer_steps"],
            wall_time=wall,
            train_time=train_time,
            diverged=diverged,
            hp=info["hp"],
            intervals=info["interval"],
            trace=trace,
        )
        detail = {
            "guard": guard,
            "collapses": collapses,
            "rollbacks": rollbacks,
            "moves": moves,
            "decisions": decisions,
        }
        return CellRun(out, detail=detail)


def _env_row(info: dict[str, Any], t0: float) -> dict[str, Any]:
    return {
        "interval": info["interval"],
        "samples": info["samples"],
        "optimizer_steps": info["optimizer_steps"],
        "wall_time": time.perf_counter() - t0,
        "val_score": info["val_score"],
        "norm_val_score": info["val_norm_score"],
        "val_loss": info["val_loss"],
        "train_loss": info["train_loss"],
        "lr": info.get("lr_in_force", info["hp"]["lr"]),
        "batch_size": info["hp"]["batch_size"],
        "dropout": info["hp"]["dropout"],
        "diverged": info["diverged"],
    }


@dataclass(frozen=True)
class RescueMethod(PolicyMethod):
    """``rescue[?after=F&floor=F]``: the hand-written rescue rule
    (:class:`rlhpo.baselines.rescue.RescueRule`) over the prior, run like a policy."""

    after: float = 0.2
    floor: float = 1 / 16

    kind: ClassVar[str] = "rescue"
    syntax: ClassVar[str] = "rescue[?after=F&floor=F]"
    options: ClassVar[frozenset[str]] = frozenset({"after", "floor"})
    takes_arg: ClassVar[bool] = False

    @classmethod
    def accepts(cls, base: str) -> bool:
        return base == "rescue"

    @classmethod
    def parse(cls, text: MethodText) -> RescueMethod:
        from rlhpo.baselines.rescue import RescueRule

        after = text.positive_float("after")
        floor = text.positive_float("floor")
        kw = {k: v for k, v in (("after", after), ("floor", floor)) if v is not None}
        try:
            RescueRule(**kw)
        except ValueError as e:
            raise text.error(str(e)) from None
        return cls(text.raw, text.name or "rescue", **kw)

    def resolve(self, suite_name: str, specs: list[TaskSpec]) -> RescueMethod:
        return self

    def setup(self) -> dict[str, Any]:
        return {"after": self.after, "floor": self.floor}

    def fingerprint(self) -> str:
        return f"rescue after={self.after!r} floor={self.floor!r}"

    def load(self):
        from rlhpo.baselines.rescue import rescue_rule

        return rescue_rule(self.after, self.floor)
