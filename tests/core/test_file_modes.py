"""Files with secrets or private facts get their modes from the code, not from the umask of
the shell that started us (a umask of 022 used to leave control.db and sis.db 0644)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from conftest import INGESTCTL, REPO


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_with_umask(umask: int, args: list[str], cwd: Path) -> str:
    """Run a real process started with ``umask``; its standard output."""
    return subprocess.run(
        args,
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=lambda: os.umask(umask),
    ).stdout


def test_init_and_a_load_under_umask_022(workdir: Path, config_file: Path) -> None:
    ctl = [*INGESTCTL, "--config", str(config_file)]
    run_with_umask(0o022, [*ctl, "init"], workdir)
    run_with_umask(0o022, [*ctl, "account", "create", "acme"], workdir)
    run_with_umask(0o022, [*ctl, "loader", "run", "acme"], workdir)  # opens the SIS DB
    script = (
        "import sys; from ingest_core.settings import load_settings\n"
        "from ingest_core.structured_log import get_logger, log_limits\n"
        "s = load_settings(sys.argv[1])\n"
        "get_logger(s.log_dir, 'server', **log_limits(s)).info('test.line')\n"
    )
    run_with_umask(0o022, [sys.executable, "-c", script, str(config_file)], workdir)
    var = workdir / "var"
    databases = [var / "control.db", var / "sis.db"]
    for database in databases:
        assert mode(database) == 0o600, database
        for side in (Path(f"{database}-wal"), Path(f"{database}-shm")):
            if side.exists():
                assert mode(side) == 0o600, side
    assert mode(workdir / "logs" / "server.jsonl") == 0o640
    for key in ("ssh_host_ed25519_key", "ssh_host_rsa_key"):
        assert mode(workdir / "keys" / key) == 0o600
        assert mode(workdir / "keys" / f"{key}.pub") == 0o644


def test_a_new_sqlite_database_is_0600_with_its_wal_whatever_the_umask(tmp_path: Path) -> None:
    """Modes seen while the database is open (SQLite removes -wal and -shm at the last close)."""
    script = (
        "import os, sys; from sqlalchemy import text; from ingest_core.db import make_engine\n"
        "engine = make_engine('sqlite:///' + sys.argv[1])\n"
        "with engine.connect() as conn:\n"
        "    conn.execute(text('CREATE TABLE t (x INTEGER)')); conn.commit()\n"
        "    for end in ('', '-wal', '-shm'):\n"
        "        print(oct(os.stat(sys.argv[1] + end).st_mode & 0o777))\n"
    )
    for umask in (0o000, 0o022, 0o077):
        database = tmp_path / f"u{umask:o}.db"
        shown = run_with_umask(umask, [sys.executable, "-c", script, str(database)], tmp_path)
        assert shown.split() == ["0o600", "0o600", "0o600"], umask
