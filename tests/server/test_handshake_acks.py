"""OpenSSH logins do not wait on our delayed ACKs (connection.HandshakeAcks, TCP_QUICKACK).

Without the re-armed TCP_QUICKACK, each OpenSSH login stalls twice on a ~40 ms delayed ACK
(the client keeps Nagle on). The kernel counts every ACK its delayed-ACK timer had to send
(TcpExt DelayedACKs), per network namespace; in a namespace of its own the server and client
are the only traffic, so the count is exact: ~2 per login without the fix, ~0 with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import server_harness
from server_harness import CLIENT_TIMEOUT, INGESTCTL, REPO, RunningServer

LOGINS = 4


@pytest.fixture
def namespace() -> Iterator[str]:
    """A fresh network namespace with loopback up (needs root and iproute2)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and `ip` to make a network namespace")
    name = f"sis-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        in_namespace(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def in_namespace(name: str, *cmd: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    options = {"capture_output": True, "text": True, "timeout": CLIENT_TIMEOUT, "check": True}
    return subprocess.run(["ip", "netns", "exec", name, *cmd], **{**options, **kwargs})


def delayed_acks(name: str) -> int:
    """TcpExt DelayedACKs of the namespace: ACKs sent late by the delayed-ACK timer."""
    lines = in_namespace(name, "cat", "/proc/net/netstat").stdout.splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=True):
        if header.startswith("TcpExt:"):
            return int(values.split()[header.split().index("DelayedACKs")])
    raise AssertionError("no TcpExt DelayedACKs in /proc/net/netstat")


@pytest.fixture
def server_in_namespace(namespace: str, tmp_path: Path, alpha_key: Path) -> Iterator[RunningServer]:
    running = server_harness.start_server(
        tmp_path / "server", {"defender": {"enabled": False}}, launch=False
    )
    server_harness.add_account(running, "alpha", alpha_key)
    stderr = open(running.workdir / "server.stderr", "ab")  # noqa: SIM115 - closed below
    running.process = subprocess.Popen(
        ["ip", "netns", "exec", namespace, *INGESTCTL, "--config", str(running.config), "server"],
        cwd=running.workdir,
        stdout=stderr,
        stderr=stderr,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        server_harness.wait_until(
            lambda: bool(running.events("server.started")) or running.process.poll() is not None,
            timeout=server_harness.START_TIMEOUT,
            what="server start",
        )
        assert running.process.poll() is None, (running.workdir / "server.stderr").read_text()
        yield running
    finally:
        running.stop()
        stderr.close()


def test_openssh_logins_are_not_delayed_by_our_acks(
    namespace: str, server_in_namespace: RunningServer, alpha_key: Path
) -> None:
    sftp = ["sftp", "-b", "-", *server_in_namespace.sftp_command(alpha_key, "alpha")[1:]]
    in_namespace(namespace, *sftp, input="pwd\n")  # a first login warms the server up
    before = delayed_acks(namespace)
    for _ in range(LOGINS):
        result = in_namespace(namespace, *sftp, input="pwd\n", check=False)
        assert result.returncode == 0, result.stderr
    late = delayed_acks(namespace) - before
    # Without the fix: about 2 per login (after KEXINIT and after NEWKEYS).
    assert late < LOGINS, f"{late} delayed ACKs in {LOGINS} logins"
