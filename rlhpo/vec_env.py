"""Vectorised ``rlhpo/HPO-v0``: many tuning episodes whose models train together.

:class:`BatchedVecEnv` is a stable-baselines3 ``VecEnv`` (and
:class:`BatchedVectorEnv` a Gymnasium ``VectorEnv``) of ``n_envs`` environments
with the semantics of ``n_envs`` separate :class:`~rlhpo.env.HPOEnv` instances:
each slot *is* an ``HPOEnv`` (a subclass that only changes where its training
run lives), with its own seed and random generator, its own task drawn at each
reset, and the env's own action decoding, reward, observation and ``info``.
What changes is how the runs are trained: every step, the runs of all slots that
hold the same batchable task train together in one
:class:`~rlhpo.trainees.batched.BatchedTrainee` (MLP, CNN: stacked weights) or
:class:`~rlhpo.trainees.functional.FunctionalTrainee` (GRU, transformer and any
other family ``torch.func`` can batch); runs of tasks neither can batch train
one by one in this process, as ``DummyVecEnv`` would.

Auto-reset follows SB3: when a slot's episode ends, ``info["terminal_observation"]``
holds its last observation and the returned observation is the new episode's
first; its run leaves the batch and the new episode's run joins its task's batch.

:class:`ShardedVecEnv` splits the slots over worker processes (one per free core),
each a ``BatchedVecEnv``. :func:`make_vec_env` picks these envs where the tasks
allow it and falls back to SB3's ``DummyVecEnv`` / ``SubprocVecEnv`` of ``HPOEnv``
otherwise.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices

from rlhpo.env import EnvConfig, HPOEnv
from rlhpo.runtime import limit_threads
from rlhpo.tasks.spec import Suite, TaskSpec, load_suite
from rlhpo.trainees import IntervalStats, Trainee, build_trainee
from rlhpo.trainees.batched import (
    CHUNK_ELEMENTS,
    SNAPSHOT_CAP_BYTES,
    BatchedRun,
    BatchedTrainee,
    check_snapshot_cap,
    supports_batching,
)
from rlhpo.trainees.functional import make_batched_trainee

BACKENDS = ("auto", "batched", "dummy", "subproc")
EXECUTORS = ("local", "ray")
# Batching pays only when several runs of one task train together. Measured
# (experiments/results/throughput_v2.md): 32 batched envs ran 4.8x one model per
# env on the 10-task v1 split (3.2 envs per task), but 0.5x on the 24-task v2
# split (1.3 envs per task), where most lockstep groups hold a single run.
MIN_RUNS_PER_TASK = 3


class RunPool:
    """The training runs of a vector env's slots, batched per task where possible.

    ``snapshot_cap_bytes`` caps each task group's live snapshots (the collapse
    guard's best states; see :class:`~rlhpo.trainees.batched.BatchedTrainee`)."""

    def __init__(
        self,
        exact: bool = False,
        chunk_elements: int = CHUNK_ELEMENTS,
        snapshot_cap_bytes: int | None = SNAPSHOT_CAP_BYTES,
    ):
        check_snapshot_cap(snapshot_cap_bytes)
        self.exact = exact
        self.chunk_elements = chunk_elements
        self.snapshot_cap_bytes = snapshot_cap_bytes
        self.groups: dict[str, BatchedTrainee] = {}

    def new_run(self, task: TaskSpec, hp: dict[str, Any], seed: int) -> BatchedRun | Trainee:
        if not supports_batching(task):
            return build_trainee(task, hp, seed=seed)
        group = self.groups.get(task.name)
        if group is None or group.spec != task:
            group = make_batched_trainee(
                task,
                exact=self.exact,
                chunk_elements=self.chunk_elements,
                snapshot_cap_bytes=self.snapshot_cap_bytes,
            )
            self.groups[task.name] = group
        return group.add(hp, seed)

    def train(self, requests: Sequence[tuple[Any, int]]) -> list[IntervalStats]:
        """Train every ``(run, samples)``: batched runs together per task."""
        out: list[IntervalStats | None] = [None] * len(requests)
        by_group: dict[int, list[int]] = defaultdict(list)
        for i, (run, n) in enumerate(requests):
            if isinstance(run, BatchedRun):
                by_group[id(run.group)].append(i)
            else:
                out[i] = run.train(n)
        for idx in by_group.values():
            group = requests[idx[0]][0].group
            for i, st in zip(idx, group.train([requests[i] for i in idx]), strict=True):
                out[i] = st
        return out  # type: ignore[return-value]

    def evaluate(self, runs: Sequence[Any]) -> list[dict[str, float]]:
        """Validation loss and score of every run."""
        out: list[dict[str, float] | None] = [None] * len(runs)
        by_group: dict[int, list[int]] = defaultdict(list)
        for i, run in enumerate(runs):
            if isinstance(run, BatchedRun):
                by_group[id(run.group)].append(i)
            else:
                out[i] = run.evaluate()
        for idx in by_group.values():
            group = runs[idx[0]].group
            for i, ev in zip(idx, group.evaluate([runs[i] for i in idx]), strict=True):
                out[i] = ev
        return out  # type: ignore[return-value]


class SlotEnv(HPOEnv):
    """One environment of a batched vector env: an ``HPOEnv`` whose runs of
    batchable tasks live in the vector env's :class:`RunPool`.

    Used on its own (``reset``/``step``) it behaves as an ``HPOEnv``; the vector
    envs call ``_begin_step`` / ``_end_step`` around one joint training step.
    """

    def __init__(self, pool: RunPool, config: EnvConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.pool = pool

    def _make_trainee(self, task: TaskSpec, hp: dict[str, Any], seed: int):
        self._release()
        return self.pool.new_run(task, hp, seed)

    def _release(self) -> None:
        if isinstance(self.trainee, BatchedRun):
            self.trainee.release()
        self.trainee = None

    def close(self) -> None:
        self._release()
        super().close()


class _Slots:
    """What both vector envs share: the slot envs, the pool and the joint step.

    ``runs_per_task > 1`` cuts the slots into blocks of that many consecutive slots
    that train the same task: a block's first slot draws its task at each reset as
    an ``HPOEnv`` does, and the others take the task their block's first slot runs
    when they reset (each with its own seed, start and run). Every slot still sees
    each task as often, but a task's runs batch together."""

    def __init__(
        self,
        n_envs: int,
        exact: bool,
        chunk_elements: int,
        config: EnvConfig,
        runs_per_task: int = 1,
    ):
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        if isinstance(runs_per_task, bool) or not isinstance(runs_per_task, int):
            raise ValueError(f"runs_per_task must be an int >= 1, got {runs_per_task!r}")
        if runs_per_task < 1:
            raise ValueError(f"runs_per_task must be an int >= 1, got {runs_per_task!r}")
        config = config.with_suite_loaded()  # parsed once, shared by every slot
        self.pool = RunPool(exact=exact, chunk_elements=chunk_elements)
        self.envs = [SlotEnv(self.pool, config) for _ in range(n_envs)]
        self.runs_per_task = runs_per_task

    def reset_slot(self, i: int, seed: int | None = None, options: dict | None = None):
        """``reset`` of slot ``i``; a slot that follows a block's first one takes its
        task (unless ``options`` names one). Reset slots in ascending order."""
        lead = i - i % self.runs_per_task
        if lead != i and not (options and "task" in options):
            leader = self.envs[lead].spec_task
            if leader is not None:
                options = {**(options or {}), "task": leader.name}
        return self.envs[i].reset(seed=seed, options=options)

    def step_all(self, actions: np.ndarray) -> list[tuple]:
        """One step of every slot (without auto-reset): the 5-tuples of ``HPOEnv.step``."""
        actions = np.asarray(actions)
        if actions.shape[0] != len(self.envs):
            raise ValueError(
                f"actions must have one row per env ({len(self.envs)}), got shape {actions.shape}"
            )
        samples = [env._begin_step(a) for env, a in zip(self.envs, actions, strict=True)]
        runs = [env.trainee for env in self.envs]
        stats = self.pool.train(list(zip(runs, samples, strict=True)))
        evals = self.pool.evaluate(runs)
        return [env._end_step(st, ev) for env, st, ev in zip(self.envs, stats, evals, strict=True)]

    def close(self) -> None:
        for env in self.envs:
            env.close()


class BatchedVecEnv(VecEnv):
    """``n_envs`` ``rlhpo/HPO-v0`` environments as an SB3 ``VecEnv``, their models
    trained together (see the module docstring).

    Args:
        n_envs: number of environments (slots).
        config: an :class:`~rlhpo.env.EnvConfig`; its fields may also be given as
            keyword arguments (``suite``, ``split``, ...), as :class:`~rlhpo.env.HPOEnv`.
        exact: replay the unbatched Trainee's dropout masks and Adam arithmetic
            (slower; for checks). Off: same distributions, other random draws.
        chunk_elements: cache-sized work unit of the batched backend.
        runs_per_task: blocks of this many slots train the same task (see
            ``_Slots``), so that batches hold several runs of a task.
    """

    def __init__(
        self,
        n_envs: int = 8,
        config: EnvConfig | None = None,
        *,
        exact: bool = False,
        chunk_elements: int = CHUNK_ELEMENTS,
        runs_per_task: int = 1,
        **env_kwargs: Any,
    ):
        self.slots = _Slots(
            n_envs, exact, chunk_elements, EnvConfig.of(config, **env_kwargs), runs_per_task
        )
        self.envs = self.slots.envs
        env = self.envs[0]
        super().__init__(n_envs, env.observation_space, env.action_space)
        self.buf_obs = np.zeros((n_envs, *env.observation_space.shape), dtype=np.float32)
        self.buf_rews = np.zeros((n_envs,), dtype=np.float32)
        self.buf_dones = np.zeros((n_envs,), dtype=bool)
        self.buf_infos: list[dict[str, Any]] = [{} for _ in range(n_envs)]
        self.metadata = env.metadata
        self.actions: np.ndarray | None = None

    # As DummyVecEnv: seeds and options set by seed()/set_options() apply to the
    # next reset() only; auto-resets use each env's own generator.
    def reset(self):
        for i in range(len(self.envs)):
            obs, self.reset_infos[i] = self.slots.reset_slot(
                i, self._seeds[i], self._options[i] or None
            )
            self.buf_obs[i] = obs
        self._reset_seeds()
        self._reset_options()
        return self.buf_obs.copy()

    def step_async(self, actions: np.ndarray) -> None:
        self.actions = actions

    def step_wait(self):
        if self.actions is None:
            raise RuntimeError("call step_async() before step_wait()")
        results = self.slots.step_all(self.actions)
        self.actions = None
        for i, (obs, rew, term, trunc, info) in enumerate(results):
            self.buf_rews[i] = rew
            self.buf_dones[i] = term or trunc
            info["TimeLimit.truncated"] = trunc and not term
            if self.buf_dones[i]:
                info["terminal_observation"] = obs
                obs, self.reset_infos[i] = self.slots.reset_slot(i)
            self.buf_obs[i] = obs
            self.buf_infos[i] = info
        return (
            self.buf_obs.copy(),
            self.buf_rews.copy(),
            self.buf_dones.copy(),
            list(self.buf_infos),
        )

    def close(self) -> None:
        self.slots.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in self.envs]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self.envs[i], attr_name) for i in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        for i in self._get_indices(indices):
            setattr(self.envs[i], attr_name, value)

    def env_method(
        self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs
    ) -> list[Any]:
        return [
            getattr(self.envs[i], method_name)(*method_args, **method_kwargs)
            for i in self._get_indices(indices)
        ]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None):
        return [False for _ in self._get_indices(indices)]  # slots are bare envs


def shard_sizes(n_envs: int, n_shards: int) -> list[int]:
    """Slots per shard: ``n_envs`` split as evenly as possible, the first shards larger.
    The one layout of :class:`ShardedVecEnv` and :class:`~rlhpo.ray_vec_env.RayVecEnv`, so
    that both give slot ``i`` the same shard (and the same batch mates)."""
    if not 1 <= n_shards <= n_envs:
        raise ValueError(f"n_procs must be in [1, n_envs={n_envs}], got {n_shards}")
    return [n_envs // n_shards + (i < n_envs % n_shards) for i in range(n_shards)]


def shard_routes(
    bounds: np.ndarray, indices: Sequence[int]
) -> list[tuple[int, list[int], list[int]]]:
    """(shard, positions in the answer, indices inside the shard) for the given slots;
    ``bounds`` are the cumulative shard sizes starting at 0."""
    routes: dict[int, tuple[list[int], list[int]]] = {}
    for pos, i in enumerate(indices):
        w = int(np.searchsorted(bounds, i, side="right") - 1)
        routes.setdefault(w, ([], []))
        routes[w][0].append(pos)
        routes[w][1].append(int(i - bounds[w]))
    return [(w, pos, loc) for w, (pos, loc) in routes.items()]


def _shard_worker(remote, parent_remote, kwargs: dict[str, Any]) -> None:
    """A worker process of :class:`ShardedVecEnv`: one BatchedVecEnv, driven by pipe."""
    import traceback

    parent_remote.close()
    limit_threads()  # a worker process: one torch thread each (rlhpo.runtime)
    env = None
    try:
        env = BatchedVecEnv(**kwargs)
        remote.send(("ok", (env.observation_space, env.action_space)))
        while True:
            cmd, data = remote.recv()
            if cmd == "close":
                break
            if cmd == "reset":
                env._seeds, env._options = data
                out = (env.reset(), list(env.reset_infos))
            elif cmd == "step":
                out = env.step(data) + (list(env.reset_infos),)
            elif cmd == "get_attr":
                out = env.get_attr(*data)
            elif cmd == "set_attr":
                out = env.set_attr(*data)
            elif cmd == "env_method":
                name, args, kw, idx = data
                out = env.env_method(name, *args, indices=idx, **kw)
            else:
                raise ValueError(f"unknown command {cmd!r}")
            remote.send(("ok", out))
    except (KeyboardInterrupt, EOFError):
        return  # parent closed the pipe or was interrupted: the worker just ends
    except Exception:  # report, do not hang the parent
        remote.send(("error", traceback.format_exc()))
    finally:
        if env is not None:
            env.close()
        remote.close()


class ShardedVecEnv(VecEnv):
    """A :class:`BatchedVecEnv` split over ``n_procs`` worker processes, one core each.

    Slot ``i`` lives in one worker and keeps the semantics (and, for the same
    seed, the episodes) it has in a single-process ``BatchedVecEnv``; each worker
    batches its own slots. Arguments as :class:`BatchedVecEnv`, plus ``n_procs``.
    """

    def __init__(
        self, n_envs: int = 8, n_procs: int = 2, start_method: str | None = None, **kwargs: Any
    ):
        import multiprocessing as mp

        sizes = shard_sizes(n_envs, n_procs)
        self.bounds = np.cumsum([0] + sizes)
        if start_method is None:  # as SB3: forkserver where there is one (fork + torch is unsafe)
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(start_method)
        self.closed = False
        self.remotes, self.procs = [], []
        for size in sizes:
            remote, work = ctx.Pipe()
            proc = ctx.Process(
                target=_shard_worker, args=(work, remote, {**kwargs, "n_envs": size}), daemon=True
            )
            proc.start()
            work.close()
            self.remotes.append(remote)
            self.procs.append(proc)
        spaces = [self._recv(r) for r in self.remotes]
        super().__init__(n_envs, *spaces[0])

    def _recv(self, remote):
        status, out = remote.recv()
        if status == "error":
            self.close()
            raise RuntimeError(f"a ShardedVecEnv worker failed:\n{out}")
        return out

    def _slices(self):
        return [slice(a, b) for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)]

    def reset(self):
        for remote, sl in zip(self.remotes, self._slices(), strict=True):
            remote.send(("reset", (self._seeds[sl], self._options[sl])))
        obs, infos = [], []
        for remote in self.remotes:
            o, ri = self._recv(remote)
            obs.append(o)
            infos += ri
        self.reset_infos = infos
        self._reset_seeds()
        self._reset_options()
        return np.concatenate(obs)

    def step_async(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions)
        for remote, sl in zip(self.remotes, self._slices(), strict=True):
            remote.send(("step", actions[sl]))

    def step_wait(self):
        parts = [self._recv(r) for r in self.remotes]
        self.reset_infos = [i for p in parts for i in p[4]]
        return (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]),
            [i for p in parts for i in p[3]],
        )

    def _call(self, cmd: str, make, indices: VecEnvIndices) -> list[Any]:
        routes = shard_routes(self.bounds, self._get_indices(indices))
        for w, _, loc in routes:
            self.remotes[w].send((cmd, make(loc)))
        out: list[Any] = [None] * sum(len(pos) for _, pos, _ in routes)
        for w, pos, _ in routes:
            res = self._recv(self.remotes[w])
            for p, r in zip(pos, res if res is not None else [None] * len(pos), strict=True):
                out[p] = r
        return out

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._call("get_attr", lambda loc: (attr_name, loc), indices)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._call("set_attr", lambda loc: (attr_name, value, loc), indices)

    def env_method(
        self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs
    ) -> list[Any]:
        return self._call(
            "env_method", lambda loc: (method_name, method_args, method_kwargs, loc), indices
        )

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None):
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in range(self.num_envs)]

    def close(self) -> None:
        if getattr(self, "closed", True):
            return
        self.closed = True
        for remote in self.remotes:
            # A worker that already died has nothing to close.
            with contextlib.suppress(BrokenPipeError, OSError):
                remote.send(("close", None))
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


class BatchedVectorEnv(gym.vector.VectorEnv):
    """The same batched environments as a Gymnasium ``VectorEnv``.

    Autoreset mode ``SAME_STEP``: a finished episode's last observation and info
    are in ``infos["final_obs"]`` / ``infos["final_info"]`` (masked by
    ``infos["_final_obs"]``) and the returned observation starts the next one.
    Arguments as :class:`BatchedVecEnv`.
    """

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    def __init__(
        self,
        n_envs: int = 8,
        config: EnvConfig | None = None,
        *,
        exact: bool = False,
        chunk_elements: int = CHUNK_ELEMENTS,
        runs_per_task: int = 1,
        **env_kwargs: Any,
    ):
        self.slots = _Slots(
            n_envs, exact, chunk_elements, EnvConfig.of(config, **env_kwargs), runs_per_task
        )
        self.envs = self.slots.envs
        self.num_envs = n_envs
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, n_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, n_envs)

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"seed list must have {self.num_envs} entries, got {len(seeds)}")
        obs = np.zeros((self.num_envs, *self.single_observation_space.shape), dtype=np.float32)
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            obs[i], info = self.slots.reset_slot(i, seeds[i], options)
            infos = self._add_info(infos, info, i)
        return obs, infos

    def step(self, actions):
        results = self.slots.step_all(actions)
        n = self.num_envs
        obs = np.zeros((n, *self.single_observation_space.shape), dtype=np.float32)
        rewards = np.zeros(n, dtype=np.float64)
        terms = np.zeros(n, dtype=np.bool_)
        truncs = np.zeros(n, dtype=np.bool_)
        infos: dict[str, Any] = {}
        for i, (o, r, term, trunc, info) in enumerate(results):
            rewards[i], terms[i], truncs[i] = r, term, trunc
            if term or trunc:
                infos = self._add_info(infos, {"final_obs": o, "final_info": info}, i)
                o, info = self.slots.reset_slot(i)
            obs[i] = o
            infos = self._add_info(infos, info, i)
        return obs, rewards, terms, truncs, infos

    def close_extras(self, **kwargs: Any) -> None:
        self.slots.close()


def batchable_tasks(
    suite: str | Suite = "default", split: str = "train", tasks: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """Names of the selected tasks that the batched backend trains, and the others."""
    s = suite if isinstance(suite, Suite) else load_suite(suite)
    specs = [s.task(t) for t in tasks] if tasks else s.split(split)
    yes = [t.name for t in specs if supports_batching(t)]
    return yes, [t.name for t in specs if not supports_batching(t)]


def make_vec_env(
    config: Any = None,
    split: str | None = None,
    n_envs: int = 8,
    seed: int = 0,
    *,
    backend: str = "auto",
    n_procs: int = 1,
    monitor: bool = True,
    exact: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
    executor: str = "local",
    runs_per_task: int = 1,
    **env_kwargs: Any,
) -> VecEnv:
    """``n_envs`` tuning environments as an SB3 ``VecEnv``; env ``i`` is seeded
    ``seed + i`` at the first ``reset()`` (as SB3's own ``make_vec_env``); later
    resets continue each env's own generator. The one factory of vector envs
    (the agents use it too).

    ``config``: an :class:`~rlhpo.env.EnvConfig` or a suite; ``split`` and
    ``env_kwargs`` are EnvConfig fields (``tasks``, ``budget_scale``, ``timing``, ...)
    that override it.

    ``backend``:

    - ``"auto"`` (default): :class:`BatchedVecEnv` if at least one selected task
      is batchable (the others then train one by one inside it) and there are at
      least ``MIN_RUNS_PER_TASK`` envs per batchable task; else
      ``SubprocVecEnv`` when ``1 < n_envs <= cores``, else ``DummyVecEnv`` of ``HPOEnv``;
    - ``"batched"``: :class:`BatchedVecEnv`, an error if no task is batchable;
    - ``"dummy"`` / ``"subproc"``: SB3's vector envs of ``HPOEnv`` (one model per env;
      ``SubprocVecEnv`` runs one process per env).

    ``n_procs > 1`` splits the batched env over that many worker processes
    (:class:`ShardedVecEnv`): one per free core.

    ``executor="ray"`` runs the ``n_procs`` shards as Ray actors instead
    (:class:`~rlhpo.ray_vec_env.RayVecEnv`, on the Ray instance or cluster this
    process is connected to), each a ``BatchedVecEnv`` where ``auto`` batches and
    its envs one by one in-process where it does not; the shard layout, and so each
    slot's episodes, are those of the local sharded env. ``backend`` must then be
    ``auto`` or ``batched``.

    ``runs_per_task > 1`` (batched, local executor): blocks of that many slots
    train the same task at a time (:class:`BatchedVecEnv`), so that each batch
    holds several runs even on a split with more tasks than envs; ``auto`` then
    batches when ``runs_per_task >= MIN_RUNS_PER_TASK``.

    ``monitor`` wraps the result in SB3's ``VecMonitor`` (``info["episode"]``).
    """
    import os

    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecMonitor

    if split is not None:
        env_kwargs["split"] = split
    cfg = EnvConfig.of(config, **env_kwargs)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    if n_procs < 1:
        raise ValueError(f"n_procs must be >= 1, got {n_procs}")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")
    if executor == "ray" and backend == "subproc":
        raise ValueError(
            "executor 'ray' steps env shards in Ray actors: backend must be auto, batched or "
            f"dummy, got {backend!r}"
        )
    if runs_per_task != 1 and (executor == "ray" or backend in ("dummy", "subproc")):
        raise ValueError(
            "runs_per_task groups the slots of a local batched env: backend must be auto or "
            f"batched with executor local, got backend={backend!r}, executor={executor!r}"
        )
    cfg = cfg.with_suite_loaded()
    yes, no = batchable_tasks(cfg.suite, cfg.split, cfg.tasks)
    if backend == "batched" and not yes:
        raise ValueError(
            f"backend 'batched' needs a batchable task (see supports_batching); got {no}"
        )
    if backend == "auto":
        enough = n_envs >= MIN_RUNS_PER_TASK * len(yes) or runs_per_task >= MIN_RUNS_PER_TASK
        if yes and enough:
            backend = "batched"
        else:
            backend = "subproc" if 1 < n_envs <= (os.cpu_count() or 1) else "dummy"
    venv: VecEnv
    if executor == "ray":
        from rlhpo.ray_vec_env import RayVecEnv

        venv = RayVecEnv(
            n_envs,
            n_procs,
            cfg,
            batched=backend == "batched",
            exact=exact,
            chunk_elements=chunk_elements,
        )
    elif backend == "batched" and n_procs > 1:
        venv = ShardedVecEnv(
            n_envs,
            n_procs,
            config=cfg,
            exact=exact,
            chunk_elements=chunk_elements,
            runs_per_task=runs_per_task,
        )
    elif backend == "batched":
        venv = BatchedVecEnv(
            n_envs, cfg, exact=exact, chunk_elements=chunk_elements, runs_per_task=runs_per_task
        )
    elif backend == "subproc":
        fns = [_HPOEnvFactory(cfg, worker=True) for _ in range(n_envs)]
        venv = SubprocVecEnv(fns, start_method="forkserver")
    else:
        venv = DummyVecEnv([_HPOEnvFactory(cfg) for _ in range(n_envs)])
    venv.seed(seed)
    return VecMonitor(venv) if monitor else venv


class _HPOEnvFactory:
    """Builds one ``HPOEnv`` (picklable, for subprocess workers)."""

    def __init__(self, config: EnvConfig, worker: bool = False):
        self.config = config
        self.worker = worker

    def __call__(self) -> HPOEnv:
        if self.worker:
            limit_threads()  # a worker process: one torch thread each (rlhpo.runtime)
        return HPOEnv(self.config)
