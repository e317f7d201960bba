"""Start a real sis-ingest server in its own process, for any test area.

A plain module (not a conftest): ``tests/`` has no ``__init__.py``, so ``import
server_harness`` works from every test. Typical use::

    running = server_harness.start_server(tmp_path)          # free port, own folders
    server_harness.add_account(running, "alpha", key_path)  # key_path: private key; .pub beside
    subprocess.run([*running.sftp_command(key_path, "alpha"), ...])
    running.stop()                                          # SIGTERM; returns the exit code

``settings`` passes extra config as ``{"section": {"key": value}}`` (e.g.
``{"limits": {"max_file_bytes": 1000}}``). Host keys are generated once per test process
and copied into each server's key folder (RSA 4096 generation takes seconds).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
INGESTCTL = [sys.executable, "-m", "ingestctl.main"]
START_TIMEOUT = 30.0
CLIENT_TIMEOUT = 60

_host_key_cache: Path | None = None
_control_db_cache: Path | None = None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    """Write a TOML config: top-level keys, then one table per dict value."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for section, values in settings.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cached_host_keys() -> Path:
    """Host keys made once per test process (ed25519 + RSA 4096)."""
    global _host_key_cache
    if _host_key_cache is None:
        sys.path.insert(0, str(REPO)) if str(REPO) not in sys.path else None
        from ingest_server.host_keys import ensure_host_keys

        folder = Path(tempfile.mkdtemp(prefix="sis-hostkeys-"))
        ensure_host_keys(folder)
        _host_key_cache = folder
    return _host_key_cache


def _cached_control_db() -> Path:
    """An empty, fully migrated control DB made once per test process (migrations are slow)."""
    global _control_db_cache
    if _control_db_cache is None:
        from ingest_core.db import open_control_db
        from ingest_core.settings import settings_from_mapping

        folder = Path(tempfile.mkdtemp(prefix="sis-controldb-"))
        settings = settings_from_mapping({"data_root": "var"}, folder, "template")
        settings.data_root.mkdir(parents=True)
        open_control_db(settings.control_db_url).engine.dispose()
        _control_db_cache = settings.data_root / "control.db"
    return _control_db_cache


@dataclass
class RunningServer:
    """A server process and everything a test needs to talk to it."""

    workdir: Path
    config: Path
    host: str
    port: int
    process: subprocess.Popen[bytes] | None
    settings_raw: dict[str, Any] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def host_key_dir(self) -> Path:
        return self.workdir / "keys"

    @property
    def known_hosts(self) -> Path:
        """A known_hosts file for this server (written on first use)."""
        path = self.workdir / "known_hosts"
        if not path.exists():
            text = self.ingestctl("hostkey", "show", "--known-hosts", self.host).stdout
            path.write_text(text, encoding="utf-8")
        return path

    def folder(self, name: str) -> Path:
        return self.workdir / "var" / "accounts" / name

    def settings(self) -> Any:
        from ingest_core.settings import load_settings

        return load_settings(self.config)

    def ingestctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*INGESTCTL, "--config", str(self.config), *args],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        if check and result.returncode != 0:
            raise AssertionError(f"ingestctl {args} failed ({result.returncode}): {result.stderr}")
        return result

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        from ingest_core.structured_log import read_events

        found = read_events(self.log_dir, "server")
        return [e for e in found if event is None or e.get("event") == event]

    def wait_for_event(self, event: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events(event):
                if all(e.get(k) == v for k, v in match.items()):
                    return e
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event} {match} in the server log")
            time.sleep(0.05)

    def ssh_options(self, key: Path, bind: str | None = None) -> list[str]:
        """OpenSSH client options: this key only, no prompts, no known_hosts pollution."""
        opts = [
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "ConnectTimeout=10",
            "-i", str(key),
        ]  # fmt: skip
        if bind:
            opts += ["-o", f"BindAddress={bind}"]
        return opts

    def sftp_command(self, key: Path, user: str, bind: str | None = None) -> list[str]:
        return ["sftp", *self.ssh_options(key, bind), "-P", str(self.port), f"{user}@{self.host}"]

    def scp_target(self, user: str, path: str = "") -> str:
        return f"{user}@{self.host}:{path}"

    def scp_command(self, key: Path, legacy: bool = False) -> list[str]:
        return ["scp", *(["-O"] if legacy else []), *self.ssh_options(key), "-P", str(self.port)]

    def ssh_command(self, key: Path, user: str) -> list[str]:
        return ["ssh", *self.ssh_options(key), "-p", str(self.port), f"{user}@{self.host}"]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code (0 after a clean shutdown)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    def restart(self) -> None:
        self.stop()
        self.process = _launch(self)


def _launch(running: RunningServer) -> subprocess.Popen[bytes]:
    started_before = len(running.events("server.started"))
    stderr = open(running.workdir / "server.stderr", "ab")  # noqa: SIM115 - lives with the process
    process = subprocess.Popen(
        [*INGESTCTL, "--config", str(running.config), "server"],
        cwd=running.workdir,
        stdout=stderr,
        stderr=stderr,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + START_TIMEOUT
    while len(running.events("server.started")) <= started_before:
        if process.poll() is not None:
            text = (running.workdir / "server.stderr").read_text(errors="replace")
            raise RuntimeError(f"server exited with {process.returncode}: {text[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("server did not start in time")
        time.sleep(0.05)
    return process


def start_server(
    workdir: Path,
    settings: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
    launch: bool = True,
) -> RunningServer:
    """Write a config with a free port under ``workdir``, init, and start the server."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(host)
    raw: dict[str, Any] = {
        "data_root": "var",
        "log_dir": "logs",
        "server": {"host": host, "port": port, "host_key_dir": "keys", "shutdown_grace": 5.0},
        "admin": {"port": 0},  # no metrics listener unless a test asks (it would share 9700)
    }
    for section, values in (settings or {}).items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    config = write_config(workdir / "ingest.toml", raw)
    keys = workdir / "keys"
    if not keys.exists():
        shutil.copytree(_cached_host_keys(), keys)
        os.chmod(keys, 0o700)
    running = RunningServer(workdir, config, host, port, None, raw)
    # What `ingestctl init` does, from cached parts: folders, a migrated DB, host keys.
    from ingest_core.folders import ensure_base_folders

    ensure_base_folders(running.settings())
    database = workdir / "var" / "control.db"
    if raw.get("control_db_url"):  # a registry elsewhere (PostgreSQL): `ingestctl init` makes it
        from ingest_core.db import open_control_db

        open_control_db(str(raw["control_db_url"]))
    elif not database.exists():
        shutil.copyfile(_cached_control_db(), database)
    if launch:
        running.process = _launch(running)
    return running


def start_node(
    base: Path, name: str, pg_url: str, shared: Path, settings: dict[str, Any] | None = None
) -> RunningServer:
    """One node of several: its own folder (``base/name``), port, logs and node id; the
    PostgreSQL control DB and the data root ``shared``. ``settings`` add to each section."""
    raw: dict[str, Any] = {
        "control_db_url": pg_url,
        "data_root": str(shared),
        "cluster": {"node_id": name},
        "limits": {"connection_rate_per_address": 0},
    }
    for section, values in (settings or {}).items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return start_server(base / name, raw)


def add_account(
    running: RunningServer,
    name: str,
    key_path: Path | None,
    ips: tuple[str, ...] = ("127.0.0.1",),
) -> None:
    """Create an account with one public key (``key_path`` + ``.pub``) and allowed addresses."""
    from ingest_core.registry import Registry

    registry = Registry(running.settings(), actor="test-harness")
    registry.create_account(name)
    if key_path is not None:
        registry.add_key(name, Path(f"{key_path}.pub").read_text(encoding="utf-8"))
    for ip in ips:
        registry.add_ip(name, ip)


# -- client-side helpers -------------------------------------------------------------------


def sftp_batch(
    running: RunningServer,
    key: Path,
    user: str,
    commands: str,
    bind: str | None = None,
    check: bool = False,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run OpenSSH sftp with a batch of commands on stdin (-b -: stops at the first error)."""
    cmd = ["sftp", *extra, "-b", "-", *running.sftp_command(key, user, bind)[1:]]
    result = subprocess.run(
        cmd, input=commands, capture_output=True, text=True, timeout=CLIENT_TIMEOUT
    )
    if check and result.returncode != 0:
        raise AssertionError(f"sftp failed ({result.returncode}): {result.stderr}")
    return result


def visible_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".ingest-upload-"))


def write_random(path: Path, size: int) -> bytes:
    """A file of ``size`` pseudo-random bytes (a random 1 MiB block repeated, fast)."""
    block = os.urandom(min(size, 1024 * 1024))
    with open(path, "wb") as handle:
        left = size
        while left > 0:
            handle.write(block[: min(left, len(block))])
            left -= len(block)
    return path.read_bytes() if size <= 8 * 1024 * 1024 else b""


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """kill -9 a client and its ssh child (started with start_new_session=True)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def dropped_before_banner(server: RunningServer, source: str) -> bool:
    """``server`` closed a connection from ``source`` without a word (a banned address)."""
    with socket.create_connection(
        (server.host, server.port), timeout=10, source_address=(source, 0)
    ) as sock:
        try:
            return sock.recv(64) == b""
        except ConnectionResetError:
            return True


def login(running: RunningServer, key: Path, user: str = "alpha", bind: str | None = None) -> Any:
    """An authenticated, idle paramiko SSH connection (from ``bind`` if given)."""
    import paramiko

    sock = socket.create_connection((running.host, running.port), timeout=20,
                                    source_address=(bind, 0) if bind else None)  # fmt: skip
    # paramiko writes one request at a time unless pipelined: with Nagle on, each 32 KiB
    # write's last segment waits for the server's delayed ACK (about 40 ms a write here).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = paramiko.Transport(sock)
    transport.start_client(timeout=20)
    transport.auth_publickey(user, paramiko.RSAKey.from_private_key_file(str(key)))
    return transport


def paramiko_sftp(
    running: RunningServer, key: Path, user: str = "alpha", bind: str | None = None
) -> Any:
    """A paramiko SFTP client on a connection of its own (closing it closes both)."""
    import paramiko

    class _OwnSFTPClient(paramiko.SFTPClient):
        def close(self) -> None:
            super().close()
            transport.close()

    transport = login(running, key, user, bind)
    try:
        sftp = _OwnSFTPClient.from_transport(transport)
    except BaseException:
        transport.close()
        raise
    assert sftp is not None
    return sftp


def memory_kib(pid: int, field: str) -> int:
    """A process's memory figure from /proc (VmRSS, VmHWM, ...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        found.append(current)
        todo += children.get(current, [])
    return found
