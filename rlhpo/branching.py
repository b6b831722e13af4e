"""Branch rollouts with common random numbers (the "vine" of TRPO, Schulman et al. 2015).

At a state of an episode, :func:`branch` continues the run once per candidate
action: the env goes back to the saved state (:meth:`rlhpo.env.HPOEnv.save_state`),
takes the action, then follows a policy (by default "keep") to the end of the
budget. Every branch replays the same data order and dropout masks, so the
difference of two branches' returns is what their first actions changed, not the
luck of the draw: an advantage estimate with far less variance than whole-episode
returns. The env is left at the state it was in.

A branch that diverges ends with the env's divergence penalty, like any episode
(with the env's ``rollback`` it pays the penalty and trains on); it never raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from rlhpo.env import HPOEnv

#: A policy the branches follow after their first action: observation -> action.
Follow = Callable[[np.ndarray], Sequence[int]]


@dataclass(frozen=True)
class Branch:
    """One continuation of a saved state."""

    action: tuple[int, ...]
    """The first action taken from the state."""
    ret: float
    """Sum of the env's rewards from the state to the end of the episode."""
    final: float
    """The final normalised validation score (0 after a divergence)."""
    diverged: bool
    steps: int
    """Env steps the branch took (its first action's included)."""


def branch(
    env: HPOEnv,
    actions: Iterable[Sequence[int]],
    follow: Follow | None = None,
) -> list[Branch]:
    """Continue ``env``'s current episode once per action, each to the end.

    ``follow`` picks the actions after the first (default: keep everything, i.e.
    ``env.codec.noop``). The env is back at its state when this returns (also after an error).
    """
    if env.trainee is None:
        raise RuntimeError("call reset() before branch()")
    if env.history.records and env.trainee.samples_seen >= env.spec_task.budget_samples:
        raise ValueError("cannot branch a finished episode: its budget is used up")
    state = env.save_state()
    out: list[Branch] = []
    try:
        for a in actions:
            env.load_state(state)
            first = tuple(int(v) for v in np.asarray(a).reshape(-1))
            o, ret, term, trunc, info = env.step(first)
            n = 1
            while not (term or trunc):
                nxt = env.codec.noop if follow is None else follow(o)
                o, r, term, trunc, info = env.step(nxt)
                ret += r
                n += 1
            out.append(
                Branch(first, float(ret), float(info["val_norm_score"]), bool(info["diverged"]), n)
            )
    finally:
        env.load_state(state)
    return out
