"""The server on a PostgreSQL control DB, and what it does while that DB is unreachable."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from server_harness import add_account, sftp_batch, start_server

pytestmark = pytest.mark.postgres


def psql(sql: str) -> None:
    subprocess.run(["psql", "-d", "postgres", "-qc", sql], check=True, capture_output=True)


def test_registry_on_postgres_and_failing_closed(
    tmp_path: Path, pg_url: str, alpha_key: Path
) -> None:
    running = start_server(tmp_path / "srv", {"control_db_url": pg_url})
    database = pg_url.rsplit("/", 1)[-1]
    try:
        add_account(running, "alpha", alpha_key)
        (tmp_path / "pg.txt").write_text("via postgres registry\n")
        sftp_batch(running, alpha_key, "alpha", f"put {tmp_path / 'pg.txt'}\n", check=True)
        assert (running.folder("alpha") / "pg.txt").exists()

        psql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
        try:
            with socket.create_connection((running.host, running.port), timeout=10) as sock:
                assert sock.recv(64) == b""  # no registry, no entry
            running.wait_for_event("connection.refused", reason="registry unavailable")
            assert running.process is not None and running.process.poll() is None
        finally:
            psql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        assert sftp_batch(running, alpha_key, "alpha", "ls\n").returncode == 0
    finally:
        assert running.stop() == 0
