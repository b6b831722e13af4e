"""Output folders of ``rlhpo train`` and ``rlhpo compare``: created with a clear error
when the path cannot be a folder, and held by one process at a time.

Two processes writing one folder corrupt it (interleaved CSV rows, two Optuna
workers failing each other's trials, two agents overwriting one checkpoint), so
each command holds an exclusive lock on ``OUT/.rlhpo.lock`` while it runs. The
lock is an OS file lock (``filelock``): the kernel drops it when its process
dies, however it dies, so a lock left by a killed run is simply taken by the
next one. Who holds it is written beside it (``.rlhpo.lock.owner``) so that the
refusal can say which process to wait for.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

LOCK = ".rlhpo.lock"
OWNER = ".rlhpo.lock.owner"


class RunFolderError(ValueError):
    """An output folder cannot be used: the path is a file, or it cannot be created."""


class RunFolderBusy(RunFolderError):
    """Another live process holds the output folder."""


def check_run_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Raise :class:`RunFolderError` if ``path`` or one of its parents is a file."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            what = "is a file" if q == p else f"is below {q}, which is a file"
            raise RunFolderError(f"{option} must be a folder, but {p} {what}")
    return p


def make_run_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Create ``path`` (and its parents) as a folder, or say in one line why it cannot be."""
    p = check_run_folder(path, option)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"{option} {p}: cannot create the folder ({e.strerror})") from e
    return p


class RunFolderLock:
    """Exclusive hold on an output folder for the life of a ``with`` block.

    Raises :class:`RunFolderBusy` at once (no waiting) when another process holds it.
    """

    def __init__(self, folder: str | os.PathLike[str], command: str = "", option: str = "--out"):
        from filelock import FileLock

        self.folder, self.command, self.option = Path(folder), command, option
        self._lock = FileLock(str(self.folder / LOCK), timeout=0)

    def acquire(self) -> RunFolderLock:
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise RunFolderBusy(
                f"{self.option} {self.folder} is in use by another rlhpo process"
                f"{self._owner()}; wait for it to finish or choose another {self.option}"
            ) from None
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": self.command,
        }
        (self.folder / OWNER).write_text(json.dumps(owner) + "\n")
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            (self.folder / OWNER).unlink(missing_ok=True)
            self._lock.release()

    def _owner(self) -> str:
        try:
            o = json.loads((self.folder / OWNER).read_text())
            return f" (pid {int(o['pid'])} on {o['host']}, since {o['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
