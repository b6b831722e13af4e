"""Run logging: a JSONL file always, Weights & Biases when enabled.

W&B runs offline unless the user set ``WANDB_MODE`` themselves: with no network
and no key, ``wandb.init`` with no mode can hang, so a mode is always passed
explicitly and nothing ever prompts. ``wandb sync DIR`` uploads offline runs later.
"""

from __future__ import annotations

import json
import math
import os
import re
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

    def log_images(self, images: dict[str, str | os.PathLike[str]]) -> None:
        """Log PNG files as W&B images under their names (JSONL gets the paths)."""
        images = {k: Path(v) for k, v in images.items() if Path(v).is_file()}
        if not images:
            return
        self.log({"event": "images", **{k: str(v) for k, v in images.items()}})
        if self.run is not None:
            import wandb

            self.run.log({k: wandb.Image(str(v)) for k, v in images.items()})

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log a table as a W&B Table (JSONL gets the rows)."""
        self.log({"event": "table", "name": name, "columns": columns, "rows": rows})
        if self.run is not None:
            import wandb

            data = [[_clean(v) for v in r] for r in rows]
            self.run.log({name: wandb.Table(columns=list(columns), data=data)})

    def log_policy(self, policy_dir: str | os.PathLike[str]) -> dict[str, Any]:
        """Log a saved policy as a W&B Artifact (type ``policy``: its manifest, weights
        and card) and put its manifest, card and weights sha256 in the run config.
        Returns those three."""
        import hashlib

        from rlhpo.policy import MANIFEST, WEIGHTS

        folder = Path(policy_dir)
        manifest = json.loads((folder / MANIFEST).read_text())
        digest = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
        card_file = folder / "README.md"
        card = card_file.read_text() if card_file.is_file() else policy_card(manifest, digest)
        info = {"policy/manifest": manifest, "policy/card": card, "policy/sha256": digest}
        self.log({"event": "policy", "dir": str(folder), "sha256": digest})
        if self.run is not None:
            import wandb

            self.run.config.update(info, allow_val_change=True)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"policy-{self.run.name or self.run.id}")
            art = wandb.Artifact(
                name,
                type="policy",
                description=card,
                metadata={"sha256": digest, **_clean(manifest)},
            )
            art.add_file(str(folder / MANIFEST), name=MANIFEST)
            art.add_file(str(folder / WEIGHTS), name=WEIGHTS)
            if card_file.is_file():
                art.add_file(str(card_file), name="README.md")
            else:
                with art.new_file("README.md") as f:
                    f.write(card)
            self.run.log_artifact(art)
        return info

    def summary(self, data: dict[str, Any]) -> None:
        """Final values: the W&B run's summary (not a history row) and a JSONL record."""
        rec = {"time": time.time(), "event": "summary", **data}
        self._jsonl.write(json.dumps(_clean(rec)) + "\n")
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


def policy_card(manifest: dict[str, Any], sha256: str) -> str:
    """A short card for a policy that has no README.md: what it is and how it was made."""
    lines = [f"# rlhpo policy ({manifest.get('agent', 'unknown agent')})", ""]
    for key in ("suite", "split", "timesteps", "seed", "mean_return", "freeze", "command"):
        if key in manifest:
            lines.append(f"- {key}: {manifest[key]}")
    lines.append(f"- weights sha256: {sha256}")
    return "\n".join(lines) + "\n"


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
