"""Two real nodes sharing one PostgreSQL and one data root, behind a real HAProxy.

Started once per test module (``cluster``); every test leaves both nodes up and HAProxy
seeing them up, so the tests do not depend on their order. Needs the local PostgreSQL
cluster and haproxy (deploy/install-system-deps.sh installs both).
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import haproxy_harness
import pytest
import server_harness
from haproxy_harness import BALANCER_ADDRESS, SHIPPED_CONFIG, Backend, HAProxy
from server_harness import RunningServer
from two_nodes import ALLOWED, NODE_ADDRESSES, Cluster, createdb


@pytest.fixture(scope="module")
def alpha_key(make_key: Callable[..., Path]) -> Path:
    return make_key("rsa", 4096, "alpha")


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, pg_server: str, alpha_key: Path
) -> Iterator[Cluster]:
    """node1 and node2 (``ingestctl server``) with a shared data root, control DB and SIS DB
    on PostgreSQL, identical host keys, behind haproxy running deploy/haproxy.cfg."""
    if haproxy_harness.haproxy_binary() is None:
        pytest.fail("haproxy is not installed (deploy/install-system-deps.sh installs it)")
    base = tmp_path_factory.mktemp("cluster")
    shared = base / "shared"
    shared.mkdir()
    databases = [createdb(pg_server), createdb(pg_server)]
    control_db_url, sis_db_url = databases[0][1], databases[1][1]
    nodes: dict[str, RunningServer] = {}
    raw: dict[str, dict[str, Any]] = {}
    haproxy: HAProxy | None = None
    try:
        for name, address in NODE_ADDRESSES.items():
            settings = {
                "data_root": str(shared),
                "control_db_url": control_db_url,
                "sis_db_url": sis_db_url,
                "server": {
                    "proxy_protocol_from": [BALANCER_ADDRESS],
                    # Long enough for the drain test to finish an upload by hand.
                    "shutdown_grace": 60.0,
                    # /healthz says 503 this long before the listener closes: longer than
                    # HAProxy needs to see it (inter 2s x fall 2), so the health check, not a
                    # refused connection, is what moves new sessions away.
                    "drain_seconds": 10.0,
                },
                "admin": {"host": address, "port": server_harness.free_port(address)},
                "cluster": {"node_id": name},
                # The balancer enforces the per-address rate across nodes: switched off on
                # the nodes here so that the tests prove the balancer's rule, not the node's.
                "limits": {"connection_rate_per_address": 0},
            }
            raw[name] = settings
            nodes[name] = server_harness.start_server(base / name, settings, host=address)
        server_harness.add_account(nodes["node1"], "alpha", alpha_key, ips=ALLOWED)
        front_port = server_harness.free_port(BALANCER_ADDRESS)
        stats = base / "haproxy.sock"
        config = base / "haproxy.cfg"
        config.write_text(
            haproxy_harness.render_haproxy_config(
                SHIPPED_CONFIG.read_text(encoding="utf-8"),
                (BALANCER_ADDRESS, front_port),
                [
                    Backend(name, node.host, node.port, raw[name]["admin"]["port"])
                    for name, node in nodes.items()
                ],
                stats,
            ),
            encoding="utf-8",
        )
        haproxy = HAProxy(config, stats, BALANCER_ADDRESS, front_port, base / "haproxy.log")
        haproxy.start()
        for name in nodes:
            haproxy.wait_for(name, up=True)
        front = RunningServer(base / "node1", nodes["node1"].config, BALANCER_ADDRESS,
                              front_port, None)  # fmt: skip
        yield Cluster(haproxy, nodes, front, control_db_url, sis_db_url, raw)
    finally:
        if haproxy is not None:
            haproxy.stop()
        for node in nodes.values():  # drain all at once, then wait for each
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in nodes.values():
            node.stop()
        from ingest_core.db import close_all

        close_all()
        for name, _url in databases:
            subprocess.run(["dropdb", "--if-exists", "--force", name], capture_output=True)
