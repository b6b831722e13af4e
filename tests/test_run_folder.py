"""Output folders: a path that cannot be a folder is a one-line error, a second live
process is refused, and a lock left by a killed process is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from rlhpo.cli import app
from rlhpo.run_folder import (
    LOCK,
    RunFolderBusy,
    RunFolderError,
    RunFolderLock,
    make_run_folder,
)

HOLDER = """
import sys, time
from rlhpo.run_folder import RunFolderLock
lock = RunFolderLock(sys.argv[1], command="holder").acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """A folder held by a live subprocess; yields (folder, process)."""
    folder = make_run_folder(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield folder, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_a_path_that_cannot_be_a_folder_is_one_clear_error(tmp_path):
    (tmp_path / "f").write_text("data")
    with pytest.raises(RunFolderError, match="--out must be a folder, but .*/f is a file"):
        make_run_folder(tmp_path / "f")
    with pytest.raises(RunFolderError, match="is below .*/f, which is a file"):
        make_run_folder(tmp_path / "f" / "sub")
    assert (tmp_path / "f").read_text() == "data"


def test_second_process_is_refused_and_a_killed_holder_is_taken_over(held):
    folder, proc = held
    with pytest.raises(RunFolderBusy, match=f"in use by another rlhpo process \\(pid {proc.pid}"):
        RunFolderLock(folder).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (folder / LOCK).exists()  # the file stays; the kernel dropped the lock
    with RunFolderLock(folder) as lock:
        assert lock._lock.is_locked
    with RunFolderLock(folder):  # released on exit
        pass


def test_cli_train_and_compare_refuse_a_held_folder(held):
    folder, proc = held
    runner = CliRunner()
    for args in (
        ["train", "--out", str(folder), "--suite", "tiny", "--no-wandb"],
        [
            "compare",
            "--out",
            str(folder),
            "--suite",
            "tiny",
            "--methods",
            "static",
            "--seeds",
            "1",
            "--no-wandb",
        ],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and f"pid {proc.pid}" in lines[0], r.output
    assert sorted(p.name for p in folder.iterdir()) == [LOCK, LOCK + ".owner"]


def test_lock_is_released_when_the_holder_exits_normally(tmp_path):
    folder = make_run_folder(tmp_path / "o")
    with RunFolderLock(folder):
        with pytest.raises(RunFolderBusy):
            RunFolderLock(folder).acquire()
    RunFolderLock(folder).acquire().release()
