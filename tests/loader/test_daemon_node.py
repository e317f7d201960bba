"""``ingestctl loader daemon`` run alone keeps its node's heartbeat and marker, and refuses a
data root another node uses with a SQLite control DB (one line, exit 1), as the server does.
The real command in a subprocess, real folders and a real SQLite control DB."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from conftest import start_loader_daemon
from sqlalchemy import select

from ingest_core.db import ClusterNode, open_control_db
from ingest_core.folders import node_marker
from ingest_core.nodes import this_node
from ingest_core.settings import Settings


def test_the_daemon_alone_keeps_the_node_seen(
    settings: Settings, workdir: Path, config_file: Path
) -> None:
    node = this_node(settings)
    db = open_control_db(settings.control_db_url)
    daemon = start_loader_daemon(workdir, config_file, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        row = None
        while time.monotonic() < deadline and row is None:
            with db.session() as session:
                row = session.scalar(select(ClusterNode).where(ClusterNode.node_id == node))
            time.sleep(0.1)
        assert row is not None, "no cluster_nodes row for the daemon's node"
        assert node_marker(settings, node).exists()
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        _out, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err


def test_the_daemon_refuses_a_data_root_another_node_uses_with_sqlite(
    settings: Settings, workdir: Path, config_file: Path
) -> None:
    marker = node_marker(settings, "other-node")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()  # another node's heartbeat, just now
    daemon = start_loader_daemon(workdir, config_file, stdout=subprocess.PIPE)
    try:
        _out, err = daemon.communicate(timeout=60)
    finally:
        if daemon.poll() is None:  # it started after all
            daemon.kill()
            daemon.communicate()
    assert daemon.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "node 'other-node' used the data root" in lines[0]
    assert "control DB is SQLite" in lines[0]
