"""Registry changes made with ingestctl take effect at the next connection, no restart."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

from server_harness import RunningServer, sftp_batch


def test_changes_apply_without_restart(
    server: RunningServer, make_key: Callable[..., Path]
) -> None:
    key = make_key("rsa", 4096, "live")
    server.ingestctl("account", "create", "live")
    server.ingestctl("key", "add", "live", f"{key}.pub")
    pid = server.process.pid if server.process else None

    # Not on any allowlist yet: dropped before the banner.
    with socket.create_connection(
        (server.host, server.port), timeout=10, source_address=("127.0.0.6", 0)
    ) as sock:
        assert sock.recv(64) == b""

    server.ingestctl("ip", "add", "live", "127.0.0.6")
    assert sftp_batch(server, key, "live", "ls\n", bind="127.0.0.6").returncode == 0

    server.ingestctl("account", "disable", "live")
    assert sftp_batch(server, key, "live", "ls\n", bind="127.0.0.6").returncode != 0

    server.ingestctl("account", "enable", "live")
    assert sftp_batch(server, key, "live", "ls\n", bind="127.0.0.6").returncode == 0

    listed = json.loads(server.ingestctl("key", "list", "live", "--json").stdout)
    server.ingestctl("key", "remove", "live", listed[0]["fingerprint"])
    assert sftp_batch(server, key, "live", "ls\n", bind="127.0.0.6").returncode != 0
    event = [e for e in server.events("auth.failure") if e["account"] == "live"][-1]
    assert event["reason"] == "key not registered to this account"
    assert server.process is not None and server.process.pid == pid  # never restarted
