"""Run logging: a JSONL file always, Weights & Biases when enabled.

W&B runs offline unless the user set ``WANDB_MODE`` themselves: with no network
and no key, ``wandb.init`` with no mode can hang, so a mode is always passed
explicitly and nothing ever prompts. ``wandb sync DIR`` uploads offline runs later.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


def wandb_mode() -> str:
    """The W&B mode in force: the user's ``WANDB_MODE``, else ``offline``."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower() or "offline"
    if mode not in ("online", "offline", "disabled", "shared", "run", "dryrun"):
        raise ValueError(f"WANDB_MODE must be online, offline or disabled, got {mode!r}")
    return {"dryrun": "offline", "run": "online"}.get(mode, mode)


class Tracker:
    """Logs metrics to ``DIR/log.jsonl`` and, unless ``use_wandb`` is False, to W&B.

    Metric names use prefixes (``agent/``, ``hp/``, ``val/``, ``train/``) so W&B
    groups them.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        config: dict[str, Any] | None = None,
        use_wandb: bool = True,
        project: str = "rlhpo",
        group: str | None = None,
        name: str | None = None,
        job_type: str | None = None,
        jsonl_name: str = "log.jsonl",
    ):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.dir / jsonl_name, "a", buffering=1)
        self.run = None
        if use_wandb:
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            mode = wandb_mode()
            if mode != "disabled":
                self.run = wandb.init(
                    project=project,
                    group=group,
                    name=name,
                    job_type=job_type,
                    config=config or {},
                    dir=str(self.dir),
                    mode=mode,
                    reinit="create_new",
                    settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
                )
        self.log({"event": "start", "config": config or {}})

    @property
    def wandb_dir(self) -> Path | None:
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        rec = {"time": time.time(), **({"step": step} if step is not None else {}), **data}
        self._jsonl.write(json.dumps(_clean(rec)) + "\n")
        if self.run is not None:
            flat = {
                k: v
                for k, v in data.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if flat:
                self.run.log(flat, step=step)

    def summary(self, data: dict[str, Any]) -> None:
        self.log({"event": "summary", **data})
        if self.run is not None:
            for k, v in data.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
        if not self._jsonl.closed:
            self._jsonl.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


def _clean(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and callable(v.item):
        try:
            return _clean(v.item())
        except (ValueError, TypeError):
            return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)
