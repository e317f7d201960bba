"""Several nodes starting at once on one empty PostgreSQL all come up: the control schema is
created under an advisory lock (one node migrates, the others wait and find it done), and a
database that cannot be reached is one line, not a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import INGESTCTL, REPO
from sqlalchemy import create_engine, text

NODES = 4


def _config(folder: Path, node: str, url: str) -> Path:
    folder.mkdir(parents=True)
    config = folder / "ingest.toml"
    config.write_text(
        f'data_root = "{folder / "var"}"\nlog_dir = "{folder / "logs"}"\n'
        f'control_db_url = "{url}"\nsis_db_url = "{url}"\n'
        f'[server]\nhost_key_dir = "{folder / "keys"}"\n'
        f'[cluster]\nnode_id = "{node}"\n'
    )
    return config


def _start_all(configs: list[Path], *args: str) -> list[subprocess.CompletedProcess[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [*INGESTCTL, "--config", str(c), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for c in configs
    ]
    results = []
    for proc, config in zip(procs, configs, strict=True):
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess([str(config)], proc.returncode, out, err))
    return results


@pytest.mark.postgres
def test_nodes_initialising_one_empty_postgresql_at_once_all_succeed(
    tmp_path: Path, pg_url: str
) -> None:
    configs = [_config(tmp_path / f"node{i}", f"node{i}", pg_url) for i in range(NODES)]
    results = _start_all(configs, "init")
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(text("select version_num from alembic_version")).all()
    finally:
        engine.dispose()
    assert len(versions) == 1  # one schema, migrated once


def test_a_control_db_that_cannot_be_reached_is_one_line(tmp_path: Path) -> None:
    # A loopback port that accepts nothing: connection refused at once.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql+psycopg://sis@127.0.0.1:{port}/sis"
    (result,) = _start_all([_config(tmp_path / "node", "node", url)], "init")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "127.0.0.1" in lines[0] or "database" in lines[0].lower(), lines[0]
