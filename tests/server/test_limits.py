"""Limits: file size, account quota, free-disk reserve, disk full, connections per address."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from server_harness import (
    CLIENT_TIMEOUT,
    RunningServer,
    add_account,
    sftp_batch,
    start_server,
    temp_files,
    write_random,
)

MAX_FILE = 1_000_000
QUOTA = 3_000_000


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, alpha_key: Path) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("limited"),
        {
            "limits": {
                "max_file_bytes": MAX_FILE,
                "account_quota_bytes": QUOTA,
                "max_connections_per_address": 3,
                "max_connections_total": 4,
                "free_disk_reserve_bytes": 0,
            },
            "server": {"login_timeout": 2.0, "max_auth_attempts": 2},
            "defender": {"enabled": False},
        },
    )
    add_account(running, "alpha", alpha_key, ips=("127.0.0.1", "127.0.0.7"))
    yield running
    running.stop()


@pytest.mark.parametrize("legacy_scp", [None, False, True], ids=["sftp", "scp", "scp-O"])
def test_file_over_the_maximum_is_refused_and_removed(
    limited: RunningServer, alpha_key: Path, tmp_path: Path, legacy_scp: bool | None
) -> None:
    source = tmp_path / "too-big.csv"
    write_random(source, MAX_FILE + 100_000)
    if legacy_scp is None:
        result = sftp_batch(limited, alpha_key, "alpha", f"put {source}\n")
    else:
        result = subprocess.run(
            [*limited.scp_command(alpha_key, legacy_scp), str(source),
             limited.scp_target("alpha", "too-big.csv")],
            capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
        )  # fmt: skip
    assert result.returncode != 0
    # OpenSSH's SFTP client shows only the status code; legacy scp shows the server's text.
    assert "Failure" in result.stderr or "file too large" in result.stderr
    folder = limited.folder("alpha")
    assert not (folder / "too-big.csv").exists()
    assert temp_files(folder) == []
    limited.wait_for_event("limit.hit", limit="max_file_bytes", name="too-big.csv")


def test_client_gets_the_reason(limited: RunningServer, alpha_key: Path, tmp_path: Path) -> None:
    source = tmp_path / "too-big.csv"
    write_random(source, MAX_FILE + 1)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(
        limited.host, limited.port, username="alpha", key_filename=str(alpha_key),
        look_for_keys=False, allow_agent=False,
    )  # fmt: skip
    try:
        with (
            pytest.raises(OSError, match="file too large"),
            client.open_sftp().open("too-big.csv", "wb") as remote,
        ):
            remote.write(source.read_bytes())
    finally:
        client.close()


def test_account_quota(limited: RunningServer, alpha_key: Path, tmp_path: Path) -> None:
    folder = limited.folder("alpha")
    for old in folder.iterdir():
        old.unlink()
    part = tmp_path / "part.csv"
    write_random(part, 900_000)
    for i in range(3):
        sftp_batch(limited, alpha_key, "alpha", f"put {part} part{i}.csv\n", check=True)
    result = sftp_batch(limited, alpha_key, "alpha", f"put {part} part3.csv\n")
    assert result.returncode != 0
    assert not (folder / "part3.csv").exists()
    assert temp_files(folder) == []
    limited.wait_for_event("limit.hit", limit="account_quota_bytes")
    # Overwriting a file does not count its old size twice.
    sftp_batch(limited, alpha_key, "alpha", f"put {part} part0.csv\n", check=True)


def test_connections_per_address(limited: RunningServer) -> None:
    held = []
    try:
        for _ in range(3):
            for _attempt in range(50):  # connections of earlier tests may still be closing
                t = paramiko.Transport((limited.host, limited.port))
                try:
                    t.start_client(timeout=20)
                except paramiko.SSHException:
                    t.close()
                    time.sleep(0.2)
                    continue
                held.append(t)
                break
        assert len(held) == 3
        with socket.create_connection((limited.host, limited.port), timeout=10) as sock:
            assert sock.recv(64) == b""  # dropped before the banner
        event = limited.wait_for_event("connection.refused", address="127.0.0.1")
        assert "too many connections" in event["reason"]
    finally:
        for t in held:
            t.close()


def test_connections_in_total(limited: RunningServer) -> None:
    held = []
    try:
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.7"):
            for _ in range(50):  # connections of earlier tests may still be closing
                sock = socket.create_connection(
                    (limited.host, limited.port), timeout=10, source_address=(source, 0)
                )
                if sock.recv(64).startswith(b"SSH-2.0-"):
                    held.append(sock)
                    break
                sock.close()
                time.sleep(0.2)
        assert len(held) == 4
        with socket.create_connection(
            (limited.host, limited.port), timeout=10, source_address=("127.0.0.7", 0)
        ) as sock:
            assert sock.recv(64) == b""
        event = limited.wait_for_event("connection.refused", address="127.0.0.7")
        assert "server full" in event["reason"]
    finally:
        for sock in held:
            sock.close()


def test_free_disk_reserve(tmp_path: Path, alpha_key: Path) -> None:
    running = start_server(tmp_path / "srv", {"limits": {"free_disk_reserve_bytes": 10**17}})
    try:
        add_account(running, "alpha", alpha_key)
        (tmp_path / "x.csv").write_text("x\n")
        result = sftp_batch(running, alpha_key, "alpha", f"put {tmp_path / 'x.csv'}\n")
        assert result.returncode != 0
        assert not (running.folder("alpha") / "x.csv").exists()
        running.wait_for_event("limit.hit", limit="free_disk_reserve_bytes")
    finally:
        running.stop()


def test_disk_full_while_writing(limited: RunningServer, tmp_path: Path, make_key) -> None:
    """A real ENOSPC: the account folder is a 2 MB tmpfs (needs root to mount)."""
    key = make_key("rsa", 4096, "full")
    add_account(limited, "full", key)
    folder = limited.folder("full")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr!r}")
    try:
        limited_ok = tmp_path / "fits.csv"
        write_random(limited_ok, 100_000)
        source = tmp_path / "huge.csv"
        write_random(source, 900_000)
        filler = folder / "filler.bin"
        filler.write_bytes(b"\0" * 1_500_000)
        result = sftp_batch(limited, key, "full", f"put {source}\n")
        assert result.returncode != 0
        assert not (folder / "huge.csv").exists()
        assert temp_files(folder) == []
        filler.unlink()
        sftp_batch(limited, key, "full", f"put {limited_ok}\n", check=True)  # still serving
        assert (folder / "fits.csv").stat().st_size == 100_000
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_idle_connection_closed_at_login_timeout(limited: RunningServer) -> None:
    with socket.create_connection((limited.host, limited.port), timeout=30) as sock:
        assert sock.recv(64).startswith(b"SSH-2.0-")
        while True:  # say nothing; the server must hang up (login_timeout is 2 s here)
            try:
                if not sock.recv(4096):
                    break
            except ConnectionResetError:
                break


def test_key_attempts_per_connection_are_capped(
    limited: RunningServer, alpha_key: Path, make_key
) -> None:
    wrong = [make_key("rsa", 4096, "beta"), make_key("rsa", 4096, "guard")]
    before = len(limited.events("auth.failure"))
    extra = ("-i", str(wrong[0]), "-i", str(wrong[1]))  # the good key comes third
    result = sftp_batch(limited, alpha_key, "alpha", "ls\n", extra=extra)
    assert result.returncode != 0  # max_auth_attempts is 2 here
    assert len(limited.events("auth.failure")) - before == 2
    assert sftp_batch(limited, alpha_key, "alpha", "ls\n").returncode == 0
