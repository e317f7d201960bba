"""IP gate before the banner, key-only authentication, and everything but SFTP/SCP refused."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from server_harness import CLIENT_TIMEOUT, RunningServer, add_account, sftp_batch, start_server
from sqlalchemy import select

from ingest_core.db import Account, AccountKey, open_control_db
from ingest_core.policy import key_bits

MESSAGE = "This service accepts SFTP and SCP only."


def raw_connect(server: RunningServer, bind: str) -> bytes:
    """Connect from ``bind`` and return whatever the server sends first (b'' if closed)."""
    address = (server.host, server.port)
    with socket.create_connection(address, timeout=10, source_address=(bind, 0)) as sock:
        try:
            return sock.recv(256)
        except ConnectionResetError:
            return b""


def transport(server: RunningServer) -> paramiko.Transport:
    t = paramiko.Transport((server.host, server.port))
    t.start_client(timeout=20)
    return t


def test_disallowed_address_is_dropped_before_the_banner(
    server: RunningServer, alpha_key: Path
) -> None:
    assert raw_connect(server, "127.0.0.2") == b""
    refused = server.wait_for_event("connection.refused", address="127.0.0.2")
    assert "allowlist" in refused["reason"]
    result = sftp_batch(server, alpha_key, "alpha", "ls\n", bind="127.0.0.2")
    assert result.returncode != 0
    assert "closed" in result.stderr.lower() or "reset" in result.stderr.lower()


def test_banner_names_no_library(server: RunningServer) -> None:
    banner = raw_connect(server, "127.0.0.1")
    assert banner.startswith(b"SSH-2.0-sis-ingest")
    assert b"asyncssh" not in banner.lower()


def test_key_of_another_account_is_refused(
    server: RunningServer, alpha_key: Path, beta_key: Path
) -> None:
    result = sftp_batch(server, alpha_key, "beta", "ls\n")
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    event = server.wait_for_event("auth.failure", account="beta")
    assert event["reason"] == "key not registered to this account"
    assert "PRIVATE" not in str(server.events())  # no key material in the log


def test_unknown_user_looks_like_a_wrong_key(server: RunningServer, alpha_key: Path) -> None:
    for user in ("beta", "nobody"):
        t = transport(server)
        try:
            key = paramiko.RSAKey.from_private_key_file(str(alpha_key))
            with pytest.raises(paramiko.AuthenticationException) as info:
                t.auth_publickey(user, key)
            assert info.type is paramiko.AuthenticationException
        finally:
            t.close()


def test_address_of_one_account_cannot_log_in_as_another(
    server: RunningServer, make_key: Callable[..., Path]
) -> None:
    delta_key = make_key("rsa", 4096, "delta")
    add_account(server, "delta", delta_key, ips=("127.0.0.3",))
    # 127.0.0.1 passes the gate (alpha's address) but is not on delta's allowlist.
    refused = sftp_batch(server, delta_key, "delta", "ls\n")
    assert refused.returncode != 0
    event = server.wait_for_event("auth.failure", account="delta")
    assert event["reason"] == "address not allowed for this account"
    assert sftp_batch(server, delta_key, "delta", "ls\n", bind="127.0.0.3").returncode == 0


@pytest.mark.parametrize("bits", [2048, 3072])
def test_short_rsa_keys_refused_even_if_registered(
    server: RunningServer, make_key: Callable[..., Path], bits: int
) -> None:
    key = make_key("rsa", bits, f"short{bits}")
    name = f"short{bits}"
    add_account(server, name, None)
    # Smuggle the key past the registry's policy, straight into the table.
    public = Path(f"{key}.pub").read_text().strip()
    import asyncssh

    parsed = asyncssh.import_public_key(public)
    assert key_bits(parsed) == bits
    db = open_control_db(server.settings().control_db_url)
    with db.session.begin() as session:
        account = session.scalar(select(Account).where(Account.name == name))
        session.add(
            AccountKey(
                account_id=account.id,
                key_type="ssh-rsa",
                bits=bits,
                fingerprint=parsed.get_fingerprint("sha256"),
                public_key=public,
            )
        )
    result = sftp_batch(server, key, name, "ls\n")
    assert result.returncode != 0
    event = server.wait_for_event("auth.failure", account=name)
    assert "below the minimum" in event["reason"]


def test_password_and_keyboard_interactive_refused(server: RunningServer) -> None:
    t = transport(server)
    try:
        with pytest.raises(paramiko.BadAuthenticationType) as info:
            t.auth_password("alpha", "secret")
        assert info.value.allowed_types == ["publickey"]
    finally:
        t.close()
    result = subprocess.run(
        [
            "ssh", "-o", "BatchMode=no",
            "-o", "PreferredAuthentications=password,keyboard-interactive",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "NumberOfPasswordPrompts=1",
            "-p", str(server.port), f"alpha@{server.host}", "true",
        ],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr


def curl_upload(server: RunningServer, key: Path, user: str, source: Path, name: str) -> int:
    """Upload with curl (libssh2 1.10: signs RSA with SHA-1 ``ssh-rsa`` only)."""
    result = subprocess.run(
        [
            "curl", "--silent", "--show-error", "--insecure", "--key", str(key),
            "--pubkey", f"{key}.pub", "--user", f"{user}:", "--upload-file", str(source),
            f"sftp://{server.host}:{server.port}/{name}",
        ],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
    )  # fmt: skip
    return result.returncode


def test_sha1_rsa_signature_refused_by_default(
    server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    (tmp_path / "curl.txt").write_text("from curl\n")
    assert curl_upload(server, alpha_key, "alpha", tmp_path / "curl.txt", "curl.txt") != 0
    assert not (server.folder("alpha") / "curl.txt").exists()
    event = server.wait_for_event("auth.failure", reason="signature refused (SHA-1 or invalid)")
    assert event["account"] == "alpha"


def test_sha1_rsa_signature_accepted_when_allowed(tmp_path: Path, alpha_key: Path) -> None:
    running = start_server(tmp_path / "srv", {"server": {"allow_sha1_rsa_signatures": True}})
    try:
        add_account(running, "alpha", alpha_key)
        (tmp_path / "curl.txt").write_text("from curl\n")
        assert curl_upload(running, alpha_key, "alpha", tmp_path / "curl.txt", "curl.txt") == 0
        assert (running.folder("alpha") / "curl.txt").read_text() == "from curl\n"
    finally:
        assert running.stop() == 0


@pytest.mark.parametrize("command", [[], ["id"]], ids=["shell", "exec-id"])
def test_shell_and_commands_refused_with_the_message(
    server: RunningServer, alpha_key: Path, command: list[str]
) -> None:
    ssh = server.ssh_command(alpha_key, "alpha")
    result = subprocess.run(
        [ssh[0], "-T", *ssh[1:], *command],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    assert result.returncode != 0
    assert MESSAGE in result.stderr
    assert result.stdout == ""


def test_pty_refused(server: RunningServer, alpha_key: Path) -> None:
    ssh = server.ssh_command(alpha_key, "alpha")
    result = subprocess.run(
        [ssh[0], "-tt", *ssh[1:]],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    assert result.returncode != 0
    assert "PTY allocation request failed" in result.stderr


def test_local_forwarding_refused(server: RunningServer, alpha_key: Path) -> None:
    ssh = server.ssh_command(alpha_key, "alpha")
    result = subprocess.run(
        [ssh[0], *ssh[1:-1], "-W", "127.0.0.1:22", ssh[-1]],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )  # -W is -L's direct-tcpip channel without a local listener
    assert result.returncode != 0
    assert "forwarding failed" in result.stderr
    t = transport(server)
    try:
        t.auth_publickey("alpha", paramiko.RSAKey.from_private_key_file(str(alpha_key)))
        with pytest.raises(paramiko.ChannelException):
            t.open_channel("direct-tcpip", ("127.0.0.1", 22), ("127.0.0.1", 40000))
    finally:
        t.close()
    server.wait_for_event("channel.refused", request="local port forwarding")


def test_remote_forwarding_refused(server: RunningServer, alpha_key: Path) -> None:
    ssh = server.ssh_command(alpha_key, "alpha")
    result = subprocess.run(
        [ssh[0], "-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9", *ssh[1:]],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    assert result.returncode != 0
    assert "forwarding failed" in result.stderr
    server.wait_for_event("channel.refused", request="remote port forwarding")


def test_x11_forwarding_refused(server: RunningServer, alpha_key: Path) -> None:
    # Agent forwarding is off too (agent_forwarding=False), but its request carries no reply
    # to observe from a client.
    t = transport(server)
    try:
        t.auth_publickey("alpha", paramiko.RSAKey.from_private_key_file(str(alpha_key)))
        chan = t.open_session()
        with pytest.raises(paramiko.SSHException):
            chan.request_x11(single_connection=True)
    finally:
        t.close()


def test_repeated_refusals_are_counted_not_logged(server: RunningServer) -> None:
    for _ in range(5):
        assert raw_connect(server, "127.0.0.8") == b""
    server.wait_for_event("connection.refused", address="127.0.0.8")
    assert len([e for e in server.events("connection.refused") if e["address"] == "127.0.0.8"]) == 1
