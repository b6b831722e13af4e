"""A rich progress bar for training: timesteps, episodes, mean return, elapsed, ETA."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainingProgress:
    """Context manager; ``update(timesteps, episodes, mean_return)`` after each step."""

    def __init__(
        self, total: int, start: int = 0, console: Console | None = None, enabled: bool = True
    ):
        self.progress = Progress(
            TextColumn("[bold]train[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TextColumn("{task.fields[episodes]} episodes"),
            TextColumn("mean return {task.fields[ret]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train", total=total, completed=start, episodes=0, ret="-"
        )

    def update(self, timesteps: int, episodes: int, mean_return: float) -> None:
        ret = "-" if mean_return != mean_return else f"{mean_return:+.3f}"
        self.progress.update(self.task, completed=timesteps, episodes=episodes, ret=ret)

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()
