"""Each session is confined to its account folder; the log and pool file are read-only."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from server_harness import CLIENT_TIMEOUT, RunningServer, sftp_batch


@pytest.fixture
def outside(server: RunningServer) -> Path:
    """A secret file next to the account folders (and so outside every one of them)."""
    secret = server.workdir / "var" / "accounts" / "secret.txt"
    secret.write_text("not yours\n")
    return secret


@pytest.mark.parametrize(
    "path", ["../secret.txt", "../../accounts/secret.txt", "/../secret.txt", "/etc/passwd"]
)
def test_dot_dot_and_absolute_paths_stay_inside(
    server: RunningServer, alpha_key: Path, outside: Path, tmp_path: Path, path: str
) -> None:
    (server.folder("alpha") / "secret.txt").unlink(missing_ok=True)
    result = sftp_batch(server, alpha_key, "alpha", f"get {path} {tmp_path / 'got'}\n")
    assert result.returncode != 0
    assert not (tmp_path / "got").exists()
    # A put to the same path is clamped into the account folder (the lexical chroot).
    (tmp_path / "up.txt").write_text("x")
    sftp_batch(server, alpha_key, "alpha", f"put {tmp_path / 'up.txt'} {path}\n")
    assert outside.read_text() == "not yours\n"
    assert not (server.workdir / "var" / "up.txt").exists()


def test_pwd_is_the_account_root(server: RunningServer, alpha_key: Path) -> None:
    result = sftp_batch(server, alpha_key, "alpha", "cd ..\npwd\n", check=True)
    assert "Remote working directory: /" in result.stdout
    assert "accounts" not in result.stdout


def test_planted_symlinks_pointing_outside_are_not_followed(
    server: RunningServer, alpha_key: Path, outside: Path, tmp_path: Path
) -> None:
    folder = server.folder("alpha")
    (folder / "escape").symlink_to(outside.parent)
    (folder / "link.txt").symlink_to(outside)
    try:
        for command in (
            f"get link.txt {tmp_path / 'a'}\n",
            f"get escape/secret.txt {tmp_path / 'b'}\n",
            "ls escape/\n",
            f"put {outside} escape/new.txt\n",
            f"put {outside} link.txt\n",
        ):
            assert sftp_batch(server, alpha_key, "alpha", command).returncode != 0, command
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
        assert not (outside.parent / "new.txt").exists()
        assert outside.read_text() == "not yours\n"
    finally:
        (folder / "escape").unlink()
        (folder / "link.txt").unlink()


def test_links_cannot_be_created(server: RunningServer, alpha_key: Path) -> None:
    (server.folder("alpha") / "target.txt").write_text("t")
    for command in ("ln -s target.txt soft\n", "ln target.txt hard\n", "ln -s /etc etc\n"):
        assert sftp_batch(server, alpha_key, "alpha", command).returncode != 0, command
    assert sorted(p.name for p in server.folder("alpha").iterdir() if p.is_symlink()) == []
    assert not (server.folder("alpha") / "hard").exists()


def test_planted_hard_link_is_not_served(
    server: RunningServer, alpha_key: Path, outside: Path, tmp_path: Path
) -> None:
    inside = server.folder("alpha") / "hard.txt"
    os.link(outside, inside)
    try:
        result = sftp_batch(server, alpha_key, "alpha", f"get hard.txt {tmp_path / 'h'}\n")
        assert result.returncode != 0
    finally:
        inside.unlink()


@pytest.mark.parametrize("name", ["sis_loader.log", "applicant_pool.txt"])
def test_log_and_pool_file_are_read_only(
    server: RunningServer, alpha_key: Path, tmp_path: Path, name: str
) -> None:
    stored = server.folder("alpha") / name
    stored.write_text("service content\n")
    got = tmp_path / "got"
    sftp_batch(server, alpha_key, "alpha", f"get {name} {got}\n", check=True)
    assert got.read_text() == "service content\n"
    (tmp_path / "evil").write_text("overwritten\n")
    (server.folder("alpha") / "other.txt").write_text("other\n")
    for command in (
        f"put {tmp_path / 'evil'} {name}\n",
        f"rename {name} moved.txt\n",
        f"rename other.txt {name}\n",
        f"rm {name}\n",
        f"chmod 600 {name}\n",
        f"chgrp 0 {name}\n",
    ):
        assert sftp_batch(server, alpha_key, "alpha", command).returncode != 0, command
    for legacy in (False, True):
        result = subprocess.run(
            [
                *server.scp_command(alpha_key, legacy=legacy),
                str(tmp_path / "evil"),
                server.scp_target("alpha", name),
            ],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
        )
        assert result.returncode != 0
    assert stored.read_text() == "service content\n"
    assert (server.folder("alpha") / "other.txt").exists()


def test_no_subfolders_by_default(server: RunningServer, alpha_key: Path) -> None:
    assert sftp_batch(server, alpha_key, "alpha", "mkdir sub\n").returncode != 0
    assert not (server.folder("alpha") / "sub").exists()


def test_service_names_are_untouchable(
    server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    (tmp_path / "x").write_text("x")
    (server.folder("alpha") / "plain.txt").write_text("p")
    for command in (
        f"put {tmp_path / 'x'} .ingest-upload-0-x\n",
        "rename plain.txt .ingest-log.lock\n",
    ):
        assert sftp_batch(server, alpha_key, "alpha", command).returncode != 0, command
    assert not any(p.name.startswith(".ingest-") for p in server.folder("alpha").iterdir())


def test_any_file_name_can_be_uploaded(
    server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    source = tmp_path / "odd name (1).TXT"
    source.write_text("odd\n")
    sftp_batch(server, alpha_key, "alpha", f'put "{source}"\n', check=True)
    assert (server.folder("alpha") / "odd name (1).TXT").read_text() == "odd\n"


@pytest.mark.parametrize("legacy", [False, True], ids=["scp", "scp-O"])
def test_errors_never_show_server_paths(
    server: RunningServer, alpha_key: Path, tmp_path: Path, legacy: bool
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    for args in (
        [server.scp_target("alpha", "missing.txt"), str(tmp_path / "m")],
        ["-r", str(tmp_path / "d"), server.scp_target("alpha", "")],
        [server.scp_target("alpha", "../../../etc/passwd"), str(tmp_path / "p")],
    ):
        result = subprocess.run(
            [*server.scp_command(alpha_key, legacy=legacy), *args],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
        )
        assert result.returncode != 0
        assert str(server.workdir) not in result.stderr, result.stderr
        assert "accounts" not in result.stderr, result.stderr


def test_subfolders_when_enabled(tmp_path: Path, alpha_key: Path) -> None:
    from server_harness import add_account, start_server, temp_files

    running = start_server(tmp_path / "srv", {"server": {"allow_subfolders": True}})
    try:
        add_account(running, "alpha", alpha_key)
        (tmp_path / "in-sub.txt").write_text("nested\n")
        commands = f"mkdir sub\nput {tmp_path / 'in-sub.txt'} sub/in-sub.txt\nls sub\n"
        sftp_batch(running, alpha_key, "alpha", commands, check=True)
        sub = running.folder("alpha") / "sub"
        assert (sub / "in-sub.txt").read_text() == "nested\n"
        assert temp_files(sub) == []
        escape = sftp_batch(running, alpha_key, "alpha", "cd sub\nget ../../secret.txt\n")
        assert escape.returncode != 0
        sftp_batch(running, alpha_key, "alpha", "rm sub/in-sub.txt\nrmdir sub\n", check=True)
        assert not sub.exists()
    finally:
        assert running.stop() == 0
