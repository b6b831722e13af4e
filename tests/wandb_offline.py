"""Read what an offline W&B run wrote (``run-*.wandb``), for tests.

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic, version),
then 32 KiB blocks of chunks (crc32 4 bytes, length 2, type 1: full, first,
middle, last), each whole record a protobuf ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            parts = [chunk]
        elif kind == _FIRST:
            parts = [chunk]
            continue
        elif kind == _MIDDLE:
            parts.append(chunk)
            continue
        else:
            parts.append(chunk)
        rec = pb.Record()
        rec.ParseFromString(b"".join(parts))
        parts = []
        yield rec


@dataclass
class OfflineRun:
    """History rows, config, summary and artifacts of one offline run."""

    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Any] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def series(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]


def _items(items) -> dict[str, Any]:
    """Items as a dict; W&B splits dict values (images, tables) into nested keys,
    which are put back together here."""
    out: dict[str, Any] = {}
    for i in items:
        path = list(i.nested_key) or [i.key]
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = json.loads(i.value_json)
    return out


def read_run(run_dir: Path, wait_s: float = 20.0) -> OfflineRun:
    """Parse the one ``run-*.wandb`` file in an offline run's folder, once it holds
    the run's exit record (W&B's service process may still be writing it for a moment
    after ``finish()`` returned)."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        recs = list(records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in recs):
            break
        assert time.monotonic() < deadline, f"{path} has no exit record after {wait_s} s"
        time.sleep(0.2)
    run = OfflineRun()
    for rec in recs:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "config":
            run.config.update(_items(rec.config.update))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
        elif kind == "run":
            run.config.update(_items(rec.run.config.update))
        elif kind == "artifact":
            run.artifacts.append(rec.artifact)
        elif kind == "files":
            run.files.extend(f.path for f in rec.files.files)
    for k, v in list(run.config.items()):
        if isinstance(v, dict) and set(v) == {"value"}:  # W&B wraps config values
            run.config[k] = v["value"]
    return run


def offline_runs(folder: Path) -> list[Path]:
    """Offline run folders under ``folder`` (any depth), oldest first."""
    return sorted(Path(folder).rglob("offline-run-*"))
