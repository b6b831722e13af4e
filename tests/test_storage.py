"""Optuna storage given with ``--storage``: checked up front with one-line errors, and a
round trip against a real PostgreSQL server (2 workers on a fresh database, then a
resume) that the test starts and stops itself."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhpo.baselines.optuna_study import StorageError, prepare_storage
from rlhpo.cli import app
from rlhpo.compare import CompareConfig, CompareError, parse_methods
from rlhpo.compare.runner import run_comparison
from tests.test_compare import TINY


def _config(out: Path, storage: str, **kw) -> CompareConfig:
    base = dict(
        out=out,
        methods=parse_methods("optuna-random:3"),
        suite=TINY,
        split="test",
        tasks=["bc-mlp"],
        seeds=[0, 1],
        starts=["default"],
        workers=2,
        storage=storage,
        use_wandb=False,
        bootstrap_reps=100,
        plots=False,
    )
    base.update(kw)
    return CompareConfig(**base)


# -- up-front checks ----------------------------------------------------------


@pytest.mark.parametrize(
    "url,message",
    [
        ("not a url", "must be an SQLAlchemy database URL.*got 'not a url'"),
        ("nosuch://host/db", "nosuch://host/db: unknown database kind"),
        ("mysql://u@127.0.0.1/db", "driver does not import.*pip install pymysql"),
        # A closed port on this machine: refused at once, password hidden.
        ("postgresql://u:secret@127.0.0.1:1/db", r"u:\*\*\*@127.0.0.1:1/db: cannot connect"),
    ],
)
def test_storage_is_checked_up_front(url, message):
    with pytest.raises(StorageError, match=message):
        prepare_storage(url, timeout_s=2)


def test_missing_postgres_driver_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    with pytest.raises(StorageError, match=r"pip install 'rlhpo\[postgres\]'"):
        prepare_storage("postgresql://u@127.0.0.1:1/db")


def test_bad_storage_fails_before_any_cell(tmp_path):
    out = tmp_path / "cmp"
    with pytest.raises(CompareError, match="cannot connect"):
        run_comparison(_config(out, "postgresql://u@127.0.0.1:1/db"), show_progress=False)
    assert not (out / "results.csv").exists() and not (out / "studies").exists()
    res = CliRunner().invoke(
        app,
        ["compare", "--out", str(out), "--suite", TINY, "--methods", "optuna-random:2"]
        + ["--tasks", "bc-mlp", "--seeds", "1", "--no-wandb", "--storage", "nosuch://x"],
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "error: --storage nosuch://x: unknown database kind" in res.output


def test_shared_sqlite_storage_gets_its_schema_up_front(tmp_path):
    import sqlalchemy

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    assert prepare_storage(url) == url
    tables = sqlalchemy.inspect(sqlalchemy.create_engine(url)).get_table_names()
    assert {"studies", "trials", "alembic_version"} <= set(tables)


# -- a real PostgreSQL server -------------------------------------------------


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 in a temporary folder; yields its URL."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    pytest.importorskip("psycopg", reason="the postgres extra is not installed")
    # initdb refuses to run as root: run the server as an unprivileged user, in a
    # folder of its own (pytest's tmp_path is private to root).
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and there is no 'nobody' user to run PostgreSQL")
        prefix = ["runuser", "-u", "nobody", "--"]
    root = Path(tempfile.mkdtemp(prefix="rlhpo-pg-"))
    os.chmod(root, 0o755)
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, port = root / "data", _free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=120)

    started = False
    try:
        run(
            str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        opts = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(root / "log"),
            "-w",
            "start",
        )
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _results(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_optuna_on_postgres_two_workers_and_resume(tmp_path, postgres, capsys):
    import optuna
    import sqlalchemy

    out = tmp_path / "cmp"
    # A fresh database: two workers start their studies at once.
    first = run_comparison(_config(out, postgres, command="pg first"), show_progress=False)
    assert first.failed == [] and first.ran == 4  # static reference + optuna, x 2 seeds
    rows = {(r["method"], r["seed"]): r for r in _results(out)}
    picked = {}
    for seed in ("0", "1"):
        r = rows[("optuna-random:3", seed)]
        detail = json.loads(r["detail"])
        assert r["runs"] == "3" and detail["storage"] == "(--storage)"
        assert detail["trials_found_at_start"] == 0
        picked[seed] = (detail["chosen_trial"], r["norm_test_score"])
    assert not (out / "studies").exists()  # nothing went to the default SQLite files
    studies = optuna.get_all_study_names(postgres)
    assert len(studies) == 2
    with sqlalchemy.create_engine(postgres).connect() as conn:
        n = conn.execute(sqlalchemy.text("SELECT count(*) FROM trials")).scalar()
        assert n == 6

    # Resume: the rows are lost (as if killed before they were written); the studies
    # are found complete in PostgreSQL, so no trial runs again and the pick is the same.
    (out / "results.csv").unlink()
    again = run_comparison(_config(out, postgres, command="pg resume"), show_progress=False)
    assert again.failed == [] and again.ran == 4
    for r in _results(out):
        if r["method"] == "optuna-random:3":
            detail = json.loads(r["detail"])
            assert detail["trials_found_at_start"] == 3
            assert (detail["chosen_trial"], r["norm_test_score"]) == picked[r["seed"]]
    with sqlalchemy.create_engine(postgres).connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT count(*) FROM trials")).scalar() == 6
    with capsys.disabled():  # the round trip, for whoever runs `make test-slow`
        print(f"\nPostgreSQL round trip: studies {sorted(studies)}; picks {picked}")
