"""Env shards as Ray actors: policy training across a Ray cluster.

:class:`RayVecEnv` is a stable-baselines3 ``VecEnv`` whose ``n_envs`` slots are
split over ``n_shards`` Ray actors (:class:`EnvShard`, one CPU each, spread over
the cluster's nodes). Each actor holds and steps its own slots, a
:class:`~rlhpo.vec_env.BatchedVecEnv` where the tasks batch and SB3's
``DummyVecEnv`` of :class:`~rlhpo.env.HPOEnv` where they do not, exactly as a worker
process of :class:`~rlhpo.vec_env.ShardedVecEnv` does. The learner stays in the
driver: ``step_async`` sends each actor its rows of the actions and ``step_wait``
gathers the answers, so PPO runs unchanged. With the same shard layout the slots
see the same episodes as in the local sharded env (same seeds, same batch mates).

A lost actor (its node died, it was killed) surfaces as Ray's ``RayActorError`` from
the next call: :data:`ACTOR_LOST` names what the trainer catches to restart from its
last checkpoint with fresh actors (:func:`rlhpo.agents.ppo.train_ppo`).

Needs the ``ray`` extra (``pip install 'rlhpo[ray]'``). Worker nodes need the same
rlhpo and torch install as the driver: the actors import rlhpo there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices

from rlhpo.env import EnvConfig
from rlhpo.runtime import RAY_WORKER_ENV, ensure_ray, limit_threads, ray_unreachable_message
from rlhpo.trainees.batched import CHUNK_ELEMENTS
from rlhpo.vec_env import BatchedVecEnv, _HPOEnvFactory, shard_routes, shard_sizes

# An actor that only starts (imports torch, builds its slots) takes seconds; one that
# has not started after this long is waiting for CPUs the cluster does not free.
STARTUP_TIMEOUT_S = 300.0


class ExecutorError(RuntimeError):
    """The Ray executor cannot run: no cluster at the address, too few CPUs, an actor
    that does not start, or actors lost again and again."""


def actor_lost_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean an env actor is gone (catch them to restart)."""
    from ray.exceptions import RayActorError

    return (RayActorError,)


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[None]:
    """Join the Ray cluster at ``address`` (or start a local instance with ``num_cpus``
    CPUs) for the ``with`` block, unless this process is already connected; leave it
    as found. An unreachable address is an :class:`ExecutorError` within seconds."""
    try:
        started = ensure_ray(num_cpus=num_cpus, address=address)
    except ConnectionError as e:
        raise ExecutorError(ray_unreachable_message(address, e)) from None
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


class EnvShard:
    """The body of one env actor: ``n_envs`` slots stepped together in its process."""

    def __init__(
        self, n_envs: int, config: EnvConfig, batched: bool, exact: bool, chunk_elements: int
    ):
        limit_threads()  # a Ray worker process: one torch thread (rlhpo.runtime)
        self.env: VecEnv
        if batched:
            self.env = BatchedVecEnv(n_envs, config, exact=exact, chunk_elements=chunk_elements)
        else:
            self.env = DummyVecEnv([_HPOEnvFactory(config) for _ in range(n_envs)])

    def describe(self) -> dict[str, Any]:
        """Spaces and where this actor runs (node id, host name, process id)."""
        import os
        import socket

        import ray

        return {
            "observation_space": self.env.observation_space,
            "action_space": self.env.action_space,
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def reset(self, seeds: list[int | None], options: list[dict]) -> tuple[np.ndarray, list]:
        self.env._seeds, self.env._options = list(seeds), list(options)
        return self.env.reset(), list(self.env.reset_infos)

    def step(self, actions: np.ndarray) -> tuple:
        return self.env.step(actions) + (list(self.env.reset_infos),)

    def get_attr(self, name: str, indices: list[int]) -> list[Any]:
        return self.env.get_attr(name, indices)

    def set_attr(self, name: str, value: Any, indices: list[int]) -> None:
        self.env.set_attr(name, value, indices)

    def env_method(self, name: str, args: tuple, kwargs: dict, indices: list[int]) -> list[Any]:
        return self.env.env_method(name, *args, indices=indices, **kwargs)

    def close(self) -> None:
        self.env.close()


class RayVecEnv(VecEnv):
    """``n_envs`` ``rlhpo/HPO-v0`` environments in ``n_shards`` Ray actors (see the
    module docstring). Connects to Ray as ``ray`` itself would if this process is not
    connected yet (a local instance); :func:`ray_session` joins a cluster.

    Args:
        n_envs: number of environments (slots).
        n_shards: actors, one CPU each, spread over the cluster's nodes.
        config: the slots' :class:`~rlhpo.env.EnvConfig` (the suite travels loaded, so
            a suite file need not exist on the worker nodes).
        batched: each actor a ``BatchedVecEnv`` (else a ``DummyVecEnv`` of ``HPOEnv``).
        exact, chunk_elements: as :class:`~rlhpo.vec_env.BatchedVecEnv`.
        startup_timeout_s: how long the actors may take to start.
    """

    def __init__(
        self,
        n_envs: int,
        n_shards: int,
        config: EnvConfig,
        *,
        batched: bool = True,
        exact: bool = False,
        chunk_elements: int = CHUNK_ELEMENTS,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ):
        import ray

        sizes = shard_sizes(n_envs, n_shards)
        self.bounds = np.cumsum([0] + sizes)
        if not ray.is_initialized():
            ensure_ray(num_cpus=n_shards)
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < n_shards:
            raise ExecutorError(
                f"n_procs must be <= the Ray cluster's CPUs ({cpus:g}): each env shard is an "
                f"actor that holds one CPU, got n_procs={n_shards}"
            )
        config = EnvConfig.of(config).with_suite_loaded()
        actor = ray.remote(EnvShard).options(
            num_cpus=1,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
            runtime_env={"env_vars": dict(RAY_WORKER_ENV)},
        )
        self.closed = False
        self.actors = [actor.remote(size, config, batched, exact, chunk_elements) for size in sizes]
        try:
            about = ray.get([a.describe.remote() for a in self.actors], timeout=startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ExecutorError(
                f"the {n_shards} env actors did not start within {startup_timeout_s:g} s: "
                "the Ray cluster has no free CPU for them (see `ray status`)"
            ) from None
        except ray.exceptions.RayError as e:
            self.close()
            raise ExecutorError(f"an env actor failed to start: {e}") from e
        self.nodes = [d["node_id"] for d in about]
        """Ray node id of each actor, in shard order."""
        self.hosts = [d["host"] for d in about]
        self._pending: list[Any] | None = None
        super().__init__(n_envs, about[0]["observation_space"], about[0]["action_space"])

    def _slices(self) -> list[slice]:
        return [slice(a, b) for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)]

    def reset(self):
        import ray

        refs = [
            a.reset.remote(self._seeds[sl], self._options[sl])
            for a, sl in zip(self.actors, self._slices(), strict=True)
        ]
        parts = ray.get(refs)
        self.reset_infos = [i for _, infos in parts for i in infos]
        self._reset_seeds()
        self._reset_options()
        return np.concatenate([obs for obs, _ in parts])

    def step_async(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions)
        self._pending = [
            a.step.remote(actions[sl]) for a, sl in zip(self.actors, self._slices(), strict=True)
        ]

    def step_wait(self):
        import ray

        if self._pending is None:
            raise RuntimeError("call step_async() before step_wait()")
        refs, self._pending = self._pending, None
        parts = ray.get(refs)
        self.reset_infos = [i for p in parts for i in p[4]]
        return (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]),
            [i for p in parts for i in p[3]],
        )

    def _call(self, method: str, args: tuple, indices: VecEnvIndices) -> list[Any]:
        import ray

        routes = shard_routes(self.bounds, self._get_indices(indices))
        refs = [getattr(self.actors[w], method).remote(*args, loc) for w, _, loc in routes]
        out: list[Any] = [None] * sum(len(pos) for _, pos, _ in routes)
        for (_, pos, _), res in zip(routes, ray.get(refs), strict=True):
            for p, r in zip(pos, res if res is not None else [None] * len(pos), strict=True):
                out[p] = r
        return out

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._call("get_attr", (attr_name,), indices)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._call("set_attr", (attr_name, value), indices)

    def env_method(
        self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs
    ) -> list[Any]:
        return self._call("env_method", (method_name, method_args, method_kwargs), indices)

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None):
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in range(self.num_envs)]

    def close(self) -> None:
        if getattr(self, "closed", True):
            return
        self.closed = True
        import ray

        # Ask each live actor to close its slots, then end it: a lost actor has nothing
        # to close, and one that does not answer in time is ended anyway.
        refs = [a.close.remote() for a in self.actors]
        with contextlib.suppress(ray.exceptions.RayError):
            ray.wait(refs, num_returns=len(refs), timeout=30)
        for a in self.actors:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(a)
