"""Population Based Training with Ray Tune: the anchor for mid-run control.

``population`` members start from hyperparameters drawn from the task's search
space; every ``perturbation_interval`` intervals the bottom quarter copies the
weights of a top-quarter member (exploit) and perturbs its hyperparameters
(explore). Members move in lock step (``synch=True``), so every member trains
exactly one run's worth of samples.

**Budget**: population x one run's sample budget (copying weights costs no
training samples). The pick is the member with the best final *validation*
score; its test score counts. Wall time is reported separately from samples:
Ray's per-iteration overhead is large on small machines.

Needs the ``ray`` extra (``pip install 'rlhpo[ray]'``).
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlhpo.baselines.optuna_study import trial_seed
from rlhpo.tasks.spec import TaskSpec


@dataclass
class MemberRecord:
    """One member's history: per-interval rows and its final result."""

    member: int
    val_norm: float
    val_score: float | None
    test_score: float | None
    test_norm: float | None
    hp: dict[str, Any]
    diverged: bool
    trace: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PBTOutcome:
    members: list[MemberRecord]
    best: MemberRecord
    samples: int
    optimizer_steps: int
    wall_time: float  # Tuner.fit, Ray's scheduling overhead included
    train_time: float  # time the members spent training and validating


def _import_ray():
    try:
        import ray
        from ray import tune
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the pbt baseline needs Ray Tune: pip install 'rlhpo[ray]'") from e
    return ray, tune


def ensure_ray(num_cpus: int = 2, address: str | None = None) -> bool:
    """:func:`rlhpo.runtime.ensure_ray`, with Ray Tune's install hint if it is missing.

    Returns True if this call started or joined Ray (the caller should shut it down).
    """
    from rlhpo.runtime import ensure_ray as start_or_join
    from rlhpo.runtime import set_ray_environment

    set_ray_environment()
    _import_ray()
    return start_or_join(num_cpus=num_cpus, address=address)


def n_intervals(spec: TaskSpec) -> int:
    """Intervals (PBT iterations) in one run of ``spec``."""
    return math.ceil(spec.budget_samples / spec.interval_samples)


def _member_class():
    _, tune = _import_ray()

    class Member(tune.Trainable):
        """One population member: a live Trainee advanced one interval per step."""

        def setup(self, config: dict[str, Any], spec: TaskSpec = None, seed: int = 0) -> None:
            from rlhpo.runtime import limit_threads
            from rlhpo.safety import DivergenceRule

            limit_threads()  # a Ray worker process: one torch thread (rlhpo.runtime)
            self.spec, self.seed = spec, seed
            self.guard = DivergenceRule()
            self._build(config)

        def _build(self, config: dict[str, Any]) -> None:
            from rlhpo.observation import normalised_score
            from rlhpo.trainees import build_trainee

            hp = {k: config[k] for k in self.spec.space.names}
            self.trainee = build_trainee(
                self.spec, hp, seed=trial_seed(self.seed, int(config["member"]))
            )
            self.norm = lambda raw: normalised_score(
                self.spec.metric, raw, self.trainee.data.n_classes
            )
            self.ref_loss = self.trainee.evaluate("val")["loss"]
            self.diverged = False

        def step(self) -> dict[str, Any]:
            spec, tr = self.spec, self.trainee
            done_before = self.iteration * spec.interval_samples
            n = max(0, min(spec.interval_samples, spec.budget_samples - done_before))
            samples = steps = 0
            seconds = 0.0
            st = None
            if not self.diverged and n > 0:
                st = tr.train(n)
                samples, steps, seconds = st.samples, st.steps, st.seconds
            t0 = time.perf_counter()
            ev = tr.evaluate("val")
            seconds += time.perf_counter() - t0
            if st is not None:
                reason = self.guard.check(
                    self.ref_loss, st.train_loss, ev["loss"], stopped=st.diverged
                )
                self.diverged = reason is not None
            else:
                self.diverged = self.diverged or not math.isfinite(ev["loss"])
            out = {
                "norm_val_score": 0.0 if self.diverged else self.norm(ev["score"]),
                "val_score": ev["score"] if math.isfinite(ev["score"]) else None,
                "step_samples": samples,
                "step_steps": steps,
                "step_seconds": seconds,
                "member_diverged": self.diverged,
                **{f"hp_{k}": v for k, v in tr.hp.items()},
            }
            if self.iteration + 1 >= n_intervals(spec):
                test = tr.evaluate("test")["score"]  # reporting only; PBT never reads it
                out["test_score"] = test if math.isfinite(test) else None
                out["test_norm"] = 0.0 if self.diverged else self.norm(test)
            return out

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            import torch

            # An internal, short-lived checkpoint between Ray actors (not a user file).
            torch.save(
                {"snap": self.trainee.snapshot(), "diverged": self.diverged},
                Path(checkpoint_dir) / "trainee.pt",
            )

        def load_checkpoint(self, checkpoint: str) -> None:
            import torch

            st = torch.load(Path(checkpoint) / "trainee.pt", weights_only=True)
            self.trainee.restore(st["snap"])
            self.diverged = bool(st["diverged"])
            # The exploited weights continue with this member's (perturbed) knobs.
            self.trainee.set_hp(**{k: self.config[k] for k in self.spec.space.names})

        def reset_config(self, new_config: dict[str, Any]) -> bool:
            # A reused actor may host another member next: start from scratch; a
            # checkpoint, if any, is restored right after this.
            self.config = new_config
            self._build(new_config)
            return True

    return Member


def _history_callback(tune):
    """Collects every reported result in the driver (no result files needed).

    Keyed by Tune's trial id: PBT's exploit copies the donor's whole config, so a
    config field cannot tell members apart.
    """

    class History(tune.Callback):
        def __init__(self) -> None:
            self.rows: dict[str, list[dict[str, Any]]] = {}
            self.errors: list[str] = []

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.rows.setdefault(trial.trial_id, []).append(dict(result))

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.errors.append(f"{trial.trial_id}: {trial.error_file}")

    return History()


def run_pbt(
    spec: TaskSpec,
    seed: int,
    population: int = 4,
    *,
    perturbation_interval: int | None = None,
    num_cpus: int = 2,
    address: str | None = None,
    storage_dir: str | os.PathLike[str] | None = None,
) -> PBTOutcome:
    """Run PBT on ``spec``; ``seed`` seeds the initial draws, the perturbations and
    the members' trainees. Ray's scheduling is asynchronous, so two runs with one
    seed can still differ slightly."""
    if population < 2:
        raise ValueError(f"population must be >= 2, got {population!r}")
    started = ensure_ray(num_cpus=num_cpus, address=address)
    ray, tune = _import_ray()
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.search.basic_variant import BasicVariantGenerator

    iters = n_intervals(spec)
    every = perturbation_interval or max(1, iters // 5)
    sp = spec.space
    mutations = sp.tune_mutations(tune)
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=every,
        hyperparam_mutations=mutations,
        synch=True,
    )
    # PBT's explore step draws from Python's and NumPy's global generators: seed
    # them for the run and give the caller's states back afterwards.
    outer_random, outer_np = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    tmp = Path(tempfile.mkdtemp(prefix="rlhpo-pbt-", dir=storage_dir))
    history = _history_callback(tune)
    t0 = time.perf_counter()
    try:
        tuner = tune.Tuner(
            tune.with_parameters(_member_class(), spec=spec, seed=seed),
            param_space={
                "member": tune.grid_search(list(range(population))),
                **sp.tune_initial(tune),
            },
            tune_config=tune.TuneConfig(
                metric="norm_val_score",
                mode="max",
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=seed),
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name="pbt",
                storage_path=str(tmp.resolve()),
                stop={"training_iteration": iters},
                verbose=0,
                callbacks=[history],
                # Keep every checkpoint: PBT may exploit an older one (the folder is
                # temporary and removed afterwards).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            ),
        )
        # With no result files written, building the ResultGrid warns per trial;
        # the results were collected by the callback instead.
        logging.getLogger("ray.tune").setLevel(logging.ERROR)
        tuner.fit()
        wall = time.perf_counter() - t0
        members = []
        samples = steps = 0
        train_time = 0.0
        for i, (trial_id, rows) in enumerate(sorted(history.rows.items())):
            samples += sum(int(r["step_samples"]) for r in rows)
            steps += sum(int(r["step_steps"]) for r in rows)
            train_time += sum(float(r["step_seconds"]) for r in rows)
            m = rows[-1]
            if int(m["training_iteration"]) < iters:
                raise RuntimeError(f"PBT member {trial_id} stopped early: {history.errors}")
            trace = [
                {
                    "interval": int(r["training_iteration"]),
                    "samples": int(r["training_iteration"]) * spec.interval_samples,
                    "norm_val_score": float(r["norm_val_score"]),
                    "val_score": _num(r.get("val_score")),
                    **{k: r[f"hp_{k}"] for k in sp.names},
                    "diverged": bool(r["member_diverged"]),
                }
                for r in rows
            ]
            members.append(
                MemberRecord(
                    member=i,
                    val_norm=float(m["norm_val_score"]),
                    val_score=_num(m.get("val_score")),
                    test_score=_num(m.get("test_score")),
                    test_norm=_num(m.get("test_norm")),
                    hp={k: m[f"hp_{k}"] for k in sp.names},
                    diverged=bool(m["member_diverged"]),
                    trace=trace,
                )
            )
    finally:
        random.setstate(outer_random)
        np.random.set_state(outer_np)
        shutil.rmtree(tmp, ignore_errors=True)
        if started:
            ray.shutdown()
    if len(members) != population:
        raise RuntimeError(
            f"PBT reported {len(members)} of {population} members; errors: {history.errors}"
        )
    best = max(members, key=lambda r: (r.val_norm, -r.member))
    return PBTOutcome(members, best, samples, steps, wall, train_time)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
