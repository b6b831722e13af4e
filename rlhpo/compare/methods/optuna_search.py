"""Optuna studies: each trial is a full single run from hyperparameters the sampler
draws; the complete trial with the best final validation score is the one counted."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rlhpo.compare.methods._base import CellRun, Method, MethodText, trace_first
from rlhpo.compare.methods._cell import Cell
from rlhpo.knobs import KNOBS
from rlhpo.tasks.spec import TaskSpec

_OPTUNA = re.compile(r"^optuna-(?P<sampler>[a-z]+)(?:-(?P<pruner>[a-z]+))?$")


def study_storage(cell: Cell) -> tuple[str, str]:
    """Storage URL and study name of an Optuna cell: by default one SQLite file per
    study under ``OUT/studies`` (no lock contention between worker processes)."""
    name = f"rlhpo-{cell.comparison}-{cell.cell_id}"
    if cell.storage:
        return cell.storage, name
    folder = Path(cell.out) / "studies"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / (cell.cell_id + '.db')).resolve()}", name


@dataclass(frozen=True)
class OptunaMethod(Method):
    """``optuna-SAMPLER[-PRUNER][:N]``: sampler tpe|random, pruner median|hyperband,
    N trials (default 20)."""

    sampler: str | None = None
    pruner: str | None = None
    n: int = 0  # trials

    kind: ClassVar[str] = "optuna"
    syntax: ClassVar[str] = "optuna-tpe|random[-median|-hyperband]:N"
    takes_arg: ClassVar[bool] = True
    start_independent: ClassVar[bool] = True
    searcher: ClassVar[bool] = True
    best_of_k: ClassVar[bool] = True

    @classmethod
    def accepts(cls, base: str) -> bool:
        return base.startswith("optuna")

    @classmethod
    def parse(cls, text: MethodText) -> OptunaMethod:
        m = _OPTUNA.match(text.base)
        if m is None:
            raise text.error(f"Optuna methods are optuna-SAMPLER[-PRUNER], got {text.base!r}")
        sampler, pruner = m.group("sampler"), m.group("pruner")
        if sampler not in ("tpe", "random"):
            raise text.error(f"Optuna sampler must be tpe or random, got {sampler!r}")
        if pruner not in (None, "median", "hyperband"):
            raise text.error(f"Optuna pruner must be median or hyperband, got {pruner!r}")
        n = text.count("number of trials", default=20, minimum=1)
        label = text.name or f"{text.base}:{n}"
        return cls(text.raw, label, sampler=sampler, pruner=pruner, n=n)

    def cost_runs(self, spec: TaskSpec) -> float:
        return float(self.n)

    def run(self, cell: Cell) -> CellRun:
        from rlhpo.baselines.optuna_study import run_study
        from rlhpo.baselines.single import RunOutcome

        spec = cell.spec
        url, name = study_storage(cell)
        st = run_study(
            spec,
            cell.seed,
            self.n,
            storage=url,
            study_name=name,
            sampler=self.sampler,
            pruner=self.pruner,
        )
        b = st.best
        if b is None:
            raise RuntimeError(f"study {name!r} finished without a complete trial")
        out = RunOutcome(
            val_score=b.val_score,
            val_norm=b.val_norm,
            test_score=b.test_score,
            test_norm=b.test_norm,
            samples=st.samples,
            optimizer_steps=st.optimizer_steps,
            wall_time=st.wall_time,
            train_time=st.train_time,
            diverged=b.diverged,
            hp=b.hp,
            intervals=b.intervals,
            trace=b.trace,
        )
        base = {"method": self.label, "task": spec.name, "seed": cell.seed}
        trials = [
            {
                **base,
                "trial": t.number,
                "state": t.state,
                **{k: t.hp.get(k) for k in KNOBS},
                "val_score": t.val_score,
                "norm_val_score": t.val_norm,
                "test_score": t.test_score,
                "norm_test_score": t.test_norm,
                "samples": t.samples,
                "optimizer_steps": t.optimizer_steps,
                "wall_time": t.wall_time,
                "intervals": t.intervals,
                "diverged": t.diverged,
                "val_trace": ";".join(f"{v:.4f}" for v in t.val_trace),
            }
            for t in st.trials
        ]
        detail = {
            "study": name,
            "storage": url if cell.storage is None else "(--storage)",
            "chosen_trial": b.number,
            "trials_found_at_start": st.found,
            "chosen_hp": b.hp,
        }
        return CellRun(out, trials, detail, runs=len(st.trials), pruned=st.n_pruned, trial=b.number)

    @classmethod
    def intervals_to_target(cls, trials: list[dict[str, Any]], target: float) -> float:
        """Intervals the study spent, in trial order, until a trial's validation score
        first reached ``target``."""
        spent = 0.0
        for r in sorted(trials, key=lambda r: r["trial"]):
            hit = trace_first(r["val_trace"], target)
            if hit != float("inf"):
                return spent + hit
            spent += r["intervals"] or 0
        return float("inf")

    @classmethod
    def notes(cls, rows: list[dict[str, Any]]) -> list[str]:
        if not rows:
            return []
        return [
            "- Optuna picks the complete trial with the best final validation score; its "
            "test score is the one counted. Trial k trains with a seed derived from (seed, k)."
        ]
