"""Two real nodes sharing one PostgreSQL and one data root, behind a real HAProxy: the
:class:`Cluster` the tests of tests/cluster/ drive (the fixture is in conftest.py)."""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass
from typing import Any

import server_harness
from haproxy_harness import HAProxy
from server_harness import RunningServer

NODE_ADDRESSES = {"node1": "127.0.0.11", "node2": "127.0.0.12"}
# Registered on the account: clients connect from these. 127.0.0.2 is on no allowlist, and
# the balancer's own address (127.0.0.10) is on none either.
ALLOWED = ("127.0.0.1", "127.0.0.3", "127.0.0.4", "127.0.0.5")
NOT_ALLOWED = "127.0.0.2"


@dataclass
class Cluster:
    """The running cluster: HAProxy, the nodes by node_id, and the client's view of it."""

    haproxy: HAProxy
    nodes: dict[str, RunningServer]
    front: RunningServer  # host/port of HAProxy's frontend, for server_harness's clients
    control_db_url: str
    sis_db_url: str
    raw: dict[str, dict[str, Any]]  # each node's settings, as written to its config

    def logins(self) -> dict[str, int]:
        """auth.success events so far, per node (which node served a session)."""
        return {name: len(node.events("auth.success")) for name, node in self.nodes.items()}

    def node_that_served(self, before: dict[str, int]) -> str:
        """The one node with a new login since ``before`` (waits for the log line)."""
        found: list[str] = []

        def one_new() -> bool:
            found[:] = [n for n, count in self.logins().items() if count > before[n]]
            return bool(found)

        server_harness.wait_until(one_new, timeout=20, what="a login line on a node")
        assert len(found) == 1, f"logins on several nodes: {found}"
        return found[0]

    def other(self, name: str) -> str:
        return next(n for n in self.nodes if n != name)

    def admin(self, name: str) -> tuple[str, int]:
        admin = self.raw[name]["admin"]
        return admin["host"], admin["port"]

    def settings(self, name: str) -> Any:
        return self.nodes[name].settings()

    def restore(self, name: str) -> None:
        """Start node ``name`` again if it is not running; wait until HAProxy sees it up."""
        node = self.nodes[name]
        if node.process is None or node.process.poll() is not None:
            node.stop()
            node.restart()
        self.haproxy.wait_for(name, up=True)


def createdb(pg_server: str) -> tuple[str, str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    subprocess.run(["createdb", name], check=True, capture_output=True)
    return name, f"{pg_server}{name}"
