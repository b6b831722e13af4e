"""Population Based Training (Ray Tune): a population of runs that copy the best
members' weights and perturb their hyperparameters; the best final member counts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from rlhpo.compare.methods._base import CellRun, Method, MethodText, trace_first
from rlhpo.compare.methods._cell import Cell
from rlhpo.knobs import KNOBS


@dataclass(frozen=True)
class PBTMethod(Method):
    """``pbt[:N]``: a population of N members (default 4); its budget is N runs."""

    n: int = 0  # population

    kind: ClassVar[str] = "pbt"
    syntax: ClassVar[str] = "pbt:N"
    takes_arg: ClassVar[bool] = True
    start_independent: ClassVar[bool] = True
    searcher: ClassVar[bool] = True
    # Ray spreads the members over the cores the worker pool uses: run after it.
    runs_in_driver: ClassVar[bool] = True

    @classmethod
    def accepts(cls, base: str) -> bool:
        return base == "pbt"

    @classmethod
    def parse(cls, text: MethodText) -> PBTMethod:
        n = text.count("population", default=4, minimum=2)
        return cls(text.raw, text.name or f"pbt:{n}", n=n)

    @classmethod
    @contextlib.contextmanager
    def driver_session(cls, num_cpus: int, address: str | None) -> Iterator[None]:
        """One Ray instance serves every PBT cell."""
        from rlhpo.baselines.pbt import ensure_ray

        started = ensure_ray(num_cpus=num_cpus, address=address)
        try:
            yield
        finally:
            if started:
                import ray

                ray.shutdown()

    def run(self, cell: Cell) -> CellRun:
        from rlhpo.baselines.pbt import run_pbt
        from rlhpo.baselines.single import RunOutcome

        spec = cell.spec
        res = run_pbt(
            spec,
            cell.seed,
            population=self.n,
            num_cpus=cell.num_cpus,
            address=cell.address,
            storage_dir=None,
        )
        b = res.best
        out = RunOutcome(
            val_score=b.val_score,
            val_norm=b.val_norm,
            test_score=b.test_score,
            test_norm=b.test_norm,
            samples=res.samples,
            optimizer_steps=res.optimizer_steps,
            wall_time=res.wall_time,
            train_time=res.train_time,
            diverged=b.diverged,
            hp=b.hp,
            intervals=len(b.trace),
            trace=b.trace,
        )
        base = {"method": self.label, "task": spec.name, "seed": cell.seed}
        trials = [
            {
                **base,
                "trial": r.member,
                "state": "MEMBER",
                **{k: r.hp.get(k) for k in KNOBS},
                "val_score": r.val_score,
                "norm_val_score": r.val_norm,
                "test_score": r.test_score,
                "norm_test_score": r.test_norm,
                "samples": min(len(r.trace) * spec.interval_samples, spec.budget_samples),
                "optimizer_steps": None,
                "wall_time": None,
                "intervals": len(r.trace),
                "diverged": r.diverged,
                "val_trace": ";".join(f"{t['norm_val_score']:.4f}" for t in r.trace),
            }
            for r in res.members
        ]
        detail = {
            "population": self.n,
            "chosen_member": b.member,
            "budget": "population x one run's samples",
            "ray_overhead_s": round(res.wall_time - res.train_time, 2),
        }
        return CellRun(out, trials, detail, runs=self.n, pruned=0, trial=b.member)

    @classmethod
    def intervals_to_target(cls, trials: list[dict[str, Any]], target: float) -> float:
        """Counted for the whole population: members x the first member to reach it."""
        return len(trials) * min(trace_first(s["val_trace"], target) for s in trials)

    @classmethod
    def notes(cls, rows: list[dict[str, Any]]) -> list[str]:
        if not rows:
            return []
        return [
            "- PBT picks the member with the best final validation score; Ray's scheduling "
            "is asynchronous, so a rerun with the same seed can differ slightly."
        ]
