"""Fixtures of the push agent's tests: a real OpenSSH sshd on loopback, a real SMTP sink,
and an agent with its own state folder.

The sshd runs as root on 127.0.0.1 with its own config, host keys and a chroot under
/srv/ingest-push-tests (ChrootDirectory needs root-owned path components, which /tmp is not).
It logs in the fixed test user ``ingestpush`` (created once, reused, password reset per
session) by password or by a key written to its own authorized_keys file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import server_harness
from aiosmtpd.controller import Controller
from server_harness import RunningServer

from ingest_core.client_keys import generate_client_keypair
from ingest_core.settings import SmtpSettings
from push_agent import connections
from push_agent.agent import Agent, open_agent
from push_agent.connections import Connection
from push_agent.settings import AgentSettings, resolve_agent_settings

SSHD = "/usr/sbin/sshd"
SSH_USER = "ingestpush"
SSHD_BASE = Path("/srv/ingest-push-tests")
REPO = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.025)
    raise RuntimeError(f"sshd did not listen on {port}: {log.read_text(errors='replace')}")


@dataclass
class SshdServer:
    """One running sshd; ``restart(host_key)`` keeps the port and changes the host key."""

    lab: SshdLab
    port: int
    host_key: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SshdServer:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        config = self.lab.root / f"sshd_config_{self.port}"
        config.write_text(
            f"ListenAddress 127.0.0.1:{self.port}\n"
            f"HostKey {self.lab.root / self.host_key}\n"
            "PidFile none\nUsePAM no\nPasswordAuthentication yes\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            f"AuthorizedKeysFile {self.lab.authorized_keys}\n"
            f"StrictModes no\nAllowUsers {SSH_USER}\nMaxAuthTries 3\n"
            "Subsystem sftp internal-sftp\nLogLevel VERBOSE\n"
            f"Match User {SSH_USER}\n"
            f"    ChrootDirectory {self.lab.chroot}\n"
            "    ForceCommand internal-sftp\n    AllowTcpForwarding no\n    X11Forwarding no\n",
            encoding="utf-8",
        )
        log = self.lab.root / f"sshd_{self.port}.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [SSHD, "-f", str(config), "-D", "-e"], stdout=out, stderr=out
            )
        _wait_listening(self.port, self.proc, log)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, host_key: str) -> None:
        self.stop()
        self.host_key = host_key
        self.start()

    def fingerprint(self) -> str:
        out = subprocess.run(
            ["ssh-keygen", "-l", "-E", "sha256", "-f", str(self.lab.root / f"{self.host_key}.pub")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.split()[1]


@dataclass
class SshdLab:
    """The sshd's world: its folder, the chroot (upload/, readonly/, pool/), user and keys."""

    root: Path
    password: str
    servers: list[SshdServer] = field(default_factory=list)

    @property
    def chroot(self) -> Path:
        return self.root / "chroot"

    @property
    def authorized_keys(self) -> Path:
        return self.root / "authorized_keys"

    def authorize(self, public_key_file: Path) -> None:
        self.authorized_keys.write_text(public_key_file.read_text(encoding="ascii"))

    def server(self, host_key: str = "host_a") -> SshdServer:
        server = SshdServer(self, free_port(), host_key).start()
        self.servers.append(server)
        return server


def _ensure_user(password: str) -> pwd.struct_passwd:
    try:
        pwd.getpwnam(SSH_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                SSH_USER,
            ],
            check=True,
            capture_output=True,
        )
    subprocess.run(["chpasswd"], input=f"{SSH_USER}:{password}\n", text=True, check=True)
    return pwd.getpwnam(SSH_USER)


def _shared_password() -> str:
    """One password for the test user across parallel workers (each would reset it)."""
    path = SSHD_BASE / "test-user-password"
    temp = SSHD_BASE / f".password-{os.getpid()}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(16))
    try:
        os.link(temp, path)  # atomic: the first worker's password wins
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    return path.read_text()


@pytest.fixture(scope="session")
def sshd_lab() -> Iterator[SshdLab]:
    if os.geteuid() != 0 or not Path(SSHD).exists():
        pytest.fail("these tests start OpenSSH sshd as root (Debian openssh-server)")
    SSHD_BASE.mkdir(mode=0o755, exist_ok=True)
    os.chmod(SSHD_BASE, 0o755)
    password = _shared_password()
    user = _ensure_user(password)
    root = SSHD_BASE / f"{os.getpid()}-{secrets.token_hex(3)}"
    root.mkdir(mode=0o755)
    lab = SshdLab(root, password)
    lab.chroot.mkdir(mode=0o755)
    for name in ("upload", "readonly", "pool"):
        (lab.chroot / name).mkdir(mode=0o755)
    os.chown(lab.chroot / "upload", user.pw_uid, user.pw_gid)
    (lab.chroot / "pool" / "applicant_pool.txt").write_bytes(b"U1001\r\nU1002\r\nU1003\r\n")
    lab.authorized_keys.write_text("")
    for key in ("host_a", "host_b"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)],
            check=True,
            capture_output=True,
        )
    yield lab
    for server in lab.servers:
        server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd(sshd_lab: SshdLab) -> SshdServer:
    """The shared sshd (host key A). Tests that change its host key start their own."""
    return sshd_lab.server()


@pytest.fixture
def upload_dir(sshd_lab: SshdLab) -> Iterator[Path]:
    """The chroot's /upload, emptied after each test."""
    yield sshd_lab.chroot / "upload"
    for entry in (sshd_lab.chroot / "upload").iterdir():
        entry.unlink()


# -- SMTP ------------------------------------------------------------------------------------


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[dict[str, object]] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        import email

        message = email.message_from_bytes(envelope.content)  # type: ignore[attr-defined]
        self.messages.append(
            {
                "to": list(envelope.rcpt_tos),  # type: ignore[attr-defined]
                "subject": message["Subject"],
                "body": message.get_payload(decode=True).decode("utf-8"),
            }
        )
        return "250 OK"


@dataclass
class SmtpSink:
    port: int
    inbox: _Inbox

    @property
    def messages(self) -> list[dict[str, object]]:
        return self.inbox.messages


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it receives."""
    inbox = _Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield SmtpSink(port, inbox)
    controller.stop()


# -- the agent -------------------------------------------------------------------------------


@pytest.fixture
def agent_settings(tmp_path: Path) -> AgentSettings:
    base = AgentSettings(
        state_dir=Path("state"),
        log_dir=Path("logs"),
        timezone="America/New_York",
        connect_timeout=5.0,
        retries=0,
        retry_backoff=0.05,
        daemon_step=0.05,
    )
    return resolve_agent_settings(base, tmp_path, "test")


@pytest.fixture
def make_agent(agent_settings: AgentSettings) -> Iterator[Callable[..., Agent]]:
    opened: list[Agent] = []

    def build(now: Callable[[], datetime] | None = None, **changes: object) -> Agent:
        settings = dataclasses.replace(agent_settings, **changes) if changes else agent_settings
        agent = open_agent(settings, now=now) if now else open_agent(settings)
        opened.append(agent)
        return agent

    yield build
    for agent in opened:
        agent.close()


@pytest.fixture
def agent(make_agent: Callable[..., Agent]) -> Agent:
    return make_agent()


@pytest.fixture
def sshd_connection(
    sshd: SshdServer, sshd_lab: SshdLab, upload_dir: Path
) -> Callable[..., Connection]:
    """A password connection to the shared sshd's /upload (override any field); /upload is
    emptied after the test."""

    def build(name: str = "sis", **changes: object) -> Connection:
        values: dict[str, object] = {
            "host": "127.0.0.1",
            "port": sshd.port,
            "remote_dir": "/upload",
            "username": SSH_USER,
            "auth": "password",
            "frequency": "daily 02:00",
            "source_kind": "command",
            "source_command": f"{sys.executable} -c \"print('id,since'); print('1,{{since}}')\"",
            "remote_name": "sis_hr_user_info.txt",
            "since_initial": "2026-01-15",
            "verify_fingerprint": True,
        }
        values.update(changes)
        return Connection(name=name, **values)  # type: ignore[arg-type]

    return build


@pytest.fixture
def push_cli(
    agent_settings: AgentSettings, tmp_path: Path
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real ``ingest-push`` in a subprocess with a config file for the test's agent."""
    config = tmp_path / "ingest-push.toml"
    smtp = agent_settings.smtp

    def write_config(smtp_port: int | None = None) -> None:
        lines = [
            f'state_dir = "{agent_settings.state_dir}"',
            f'log_dir = "{agent_settings.log_dir}"',
            f'timezone = "{agent_settings.timezone}"',
            f"connect_timeout = {agent_settings.connect_timeout}",
            "retries = 0",
        ]
        if smtp_port:
            lines += [
                "[smtp]",
                'host = "127.0.0.1"',
                f"port = {smtp_port}",
                'sender = "push@example.test"',
            ]
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    write_config(None if not smtp.host else smtp.port)

    def run(
        *args: str, input: str | None = None, smtp_port: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        if smtp_port:
            write_config(smtp_port)
        return subprocess.run(
            [sys.executable, "-m", "push_agent.cli", "--config", str(config), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    return run


# -- our own ingest server (ed25519 and RSA host keys) ----------------------------------------


@pytest.fixture(scope="module")
def ingest_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = server_harness.start_server(tmp_path_factory.mktemp("ingest-server"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def alpha_key(ingest_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One agent-style key (RSA 4096, made by the agent's generator) registered as 'alpha'."""
    path = tmp_path_factory.mktemp("alpha-key") / "alpha"
    generate_client_keypair(path, comment="ingest-push:alpha")
    server_harness.add_account(ingest_server, "alpha", path)
    return path


@pytest.fixture
def alpha(
    agent: Agent, ingest_server: RunningServer, alpha_key: Path, tmp_path: Path
) -> Callable[..., Connection]:
    """Connection 'alpha' using the registered key; call it with changes to edit."""
    source = tmp_path / "sis_hr_user_info.txt"
    source.write_bytes(b"uuuid\tfirst_name\r\nU1\tAda\r\n")
    base = Connection(
        name="alpha",
        host="127.0.0.1",
        port=ingest_server.port,
        remote_dir="/",
        username="alpha",
        auth="key",
        frequency="daily 02:00",
        source_kind="file",
        source_path=str(source),
        since_initial="2026-01-01",
    )
    connections.add(agent, base)
    target = connections.key_path(agent, "alpha")
    shutil.copyfile(alpha_key, target)
    target.chmod(0o600)
    shutil.copyfile(f"{alpha_key}.pub", f"{target}.pub")

    def edit(**changes: object) -> Connection:
        if changes:
            connections.edit(agent, "alpha", changes)
        return connections.get(agent, "alpha")

    return edit


def smtp_settings(port: int) -> SmtpSettings:
    return SmtpSettings(host="127.0.0.1", port=port, sender="push@example.test", timeout=5.0)


class FakeClock:
    """An injectable UTC clock: ``clock()`` is now; ``clock.at(...)`` moves it."""

    def __init__(self, start: datetime):
        self.value = start

    def __call__(self) -> datetime:
        return self.value

    def at(self, text: str) -> datetime:
        self.value = datetime.fromisoformat(text)
        return self.value


def ready(agent: Agent, conn: Connection, password: str) -> Connection:
    """Add a connection and pass Test and Save with its fingerprint confirmed."""
    import asyncio

    from push_agent import connections, runs

    connections.add(agent, conn, password)
    first = asyncio.run(runs.test_connection(agent, conn.name))
    assert first.ok, first.failure
    if conn.verify_fingerprint:
        again = asyncio.run(runs.test_connection(agent, conn.name, accept=first.fingerprint))
        assert again.pinned
    return conn


class CuttingProxy:
    """A loopback TCP proxy that cuts chosen connections after N client bytes: a network
    interruption in the middle of an upload, for real."""

    def __init__(self, upstream_port: int, cut_after: int, cut: set[int]):
        import threading

        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.cut = cut
        self.count = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.count += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            limit = self.cut_after if self.count in self.cut else None
            for src, dst, lim in ((client, upstream, limit), (upstream, client, None)):
                threading.Thread(
                    target=self._pump, args=(src, dst, lim, (client, upstream)), daemon=True
                ).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, limit: int | None, pair: tuple) -> None:  # type: ignore[type-arg]
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
                if limit is not None and sent >= limit:
                    break
        except OSError:
            pass
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
