"""Two real sis-ingest nodes behind a real HAProxy that runs the shipped deploy/haproxy.cfg.

A plain module (tests/ has no ``__init__.py``; pytest's pythonpath lists this folder), used
by tests/cluster/ and by bench/cluster_bench.py. The HAProxy config is always the shipped file
with only its addresses, ports, stats socket and log target replaced
(:func:`render_haproxy_config`): each replacement must match exactly once, so an edit of the
shipped file that these tests no longer cover fails loudly instead of being skipped.

Layout on loopback: HAProxy listens on 127.0.0.10 and connects to the nodes FROM 127.0.0.10
(so a node's log can tell the balancer from a client), node1 on 127.0.0.11, node2 on
127.0.0.12, each with its admin listener (``/healthz``) on its own address and port.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from server_harness import process_tree

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "deploy" / "haproxy.cfg"
BACKEND = "sftp_nodes"
BALANCER_ADDRESS = "127.0.0.10"
START_TIMEOUT = 20.0


def haproxy_binary() -> str | None:
    """Where haproxy is installed (Debian puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("haproxy")
    if found:
        return found
    return "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None


@dataclass(frozen=True)
class Backend:
    """One node as HAProxy sees it: SSH address and port, admin (health check) port."""

    name: str
    host: str
    port: int
    admin_port: int


def _replace_once(text: str, old: str, new: str) -> str:
    count = text.count(old)
    if count != 1:
        raise AssertionError(f"deploy/haproxy.cfg: expected {old!r} once, found it {count} times")
    return text.replace(old, new)


def render_haproxy_config(
    template: str,
    bind: tuple[str, int],
    nodes: list[Backend],
    stats_socket: Path,
    source: str | None = BALANCER_ADDRESS,
    per_address_connections: int | None = None,
    per_address_rate: int | None = None,
) -> str:
    """The shipped config with this machine's addresses: frontend ``bind``, one ``server``
    line per node (its admin port for the check, and the balancer's ``source`` address),
    the stats socket and log target in the test's folders. The per-address limits stay as
    shipped unless given (the benchmark raises them: all its clients are one address)."""
    text = _replace_once(template, "    bind :22\n", f"    bind {bind[0]}:{bind[1]}\n")
    servers = re.findall(r"^    server \S+ \S+\n", text, flags=re.M)
    if len(servers) < 1:
        raise AssertionError("deploy/haproxy.cfg: no `server` line in the backend")
    lines = "".join(
        f"    server {n.name} {n.host}:{n.port} port {n.admin_port}"
        + (f" source {source}" if source else "")
        + "\n"
        for n in nodes
    )
    block = "".join(servers)
    if block not in text:
        raise AssertionError("deploy/haproxy.cfg: the `server` lines are not one block")
    text = text.replace(block, lines)
    text = _replace_once(
        text, "stats socket /run/haproxy/admin.sock", f"stats socket {stats_socket}"
    )
    text = _replace_once(text, "log /dev/log local0", "log stderr format raw local0")
    if os.geteuid() != 0:  # chroot and dropping privileges need root
        for line in ("    chroot /var/lib/haproxy\n", "    user haproxy\n", "    group haproxy\n"):
            text = _replace_once(text, line, "")
    if per_address_connections is not None:
        text = _replace_once(
            text, "sc0_conn_cur gt 10 }", f"sc0_conn_cur gt {per_address_connections} }}"
        )
    if per_address_rate is not None:
        text = _replace_once(
            text, "sc0_conn_rate gt 10 }", f"sc0_conn_rate gt {per_address_rate} }}"
        )
    return text


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    """``haproxy -c -f PATH``: the config parses and is consistent."""
    binary = haproxy_binary()
    assert binary is not None, "haproxy is not installed (deploy/install-system-deps.sh)"
    return subprocess.run(
        [binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30
    )


@dataclass
class HAProxy:
    """A running ``haproxy -db`` with its stats socket, for reading each node's state."""

    config: Path
    stats_socket: Path
    host: str
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    _log_handle: object = field(default=None, repr=False)

    def start(self) -> None:
        binary = haproxy_binary()
        assert binary is not None, "haproxy is not installed (deploy/install-system-deps.sh)"
        self._log_handle = open(self.log, "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [binary, "-f", str(self.config), "-db"],
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,  # type: ignore[arg-type]
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.stats_socket.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited {self.process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def command(self, line: str) -> str:
        """One command on the stats socket (``show stat``, ``show table sftp`` ...)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: name -> row (status, check_status, scur ...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row
            for row in rows
            if row.get("pxname") == BACKEND and row.get("svname") not in ("BACKEND", "FRONTEND")
        }

    def wait_for(self, name: str, up: bool, timeout: float = 30.0) -> dict[str, str]:
        """Until HAProxy's health check says node ``name`` is up (L7OK) or down; its row."""
        deadline = time.monotonic() + timeout
        row: dict[str, str] = {}
        while time.monotonic() < deadline:
            row = self.servers().get(name, {})
            status = row.get("status", "")
            if up and status == "UP" and row.get("check_status") == "L7OK":
                return row
            if not up and status.startswith("DOWN"):
                return row
            time.sleep(0.1)
        raise AssertionError(f"haproxy: {name} not {'UP' if up else 'DOWN'} in time: {row}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        if self._log_handle is not None:
            self._log_handle.close()  # type: ignore[attr-defined]
            self._log_handle = None


def healthz(host: str, port: int) -> int:
    """The HTTP status of a node's ``GET /healthz`` (0: nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def kill_tree(pid: int) -> None:
    """kill -9 a node: its listener and every worker at once, as a machine that dies."""
    for each in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)


def banner_or_closed(
    host: str, port: int, source: str, timeout: float = 10.0
) -> socket.socket | None:
    """Connect from ``source``: the socket if an SSH banner arrives (kept open), None if the
    connection is closed (or reset) before any SSH byte."""
    try:  # a refusal can reset the connection before connect() even returns
        sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
    except ConnectionResetError:
        return None
    try:
        data = sock.recv(64)
    except (ConnectionResetError, TimeoutError):
        data = b""
    if data.startswith(b"SSH-"):
        return sock
    sock.close()
    return None
