"""Uploads with real clients: byte-for-byte, atomic names, overwrite, resume, timestamps."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest
from server_harness import (
    CLIENT_TIMEOUT,
    RunningServer,
    paramiko_sftp,
    sftp_batch,
    temp_files,
    write_random,
)


@pytest.mark.parametrize("tool", ["sftp", "scp", "scp-O", "paramiko"])
def test_upload_arrives_byte_for_byte(
    server: RunningServer, alpha_key: Path, tmp_path: Path, tool: str
) -> None:
    source = tmp_path / "source.bin"
    data = write_random(source, 3 * 1024 * 1024 + 17)
    name = f"upload-{tool}.txt"
    if tool == "sftp":
        sftp_batch(server, alpha_key, "alpha", f"put {source} {name}\n", check=True)
    elif tool == "paramiko":
        sftp = paramiko_sftp(server, alpha_key, "alpha")
        sftp.put(str(source), name)
        sftp.close()
    else:
        cmd = [*server.scp_command(alpha_key, legacy=tool == "scp-O"), str(source)]
        result = subprocess.run(
            [*cmd, server.scp_target("alpha", name)],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
        )
        assert result.returncode == 0, result.stderr  # OpenSSH scp exits 0 after an upload
    stored = server.folder("alpha") / name
    assert stored.read_bytes() == data
    assert temp_files(server.folder("alpha")) == []
    event = server.wait_for_event("file.received", account="alpha", name=name)
    assert event["bytes"] == len(data)
    assert event["sha256"] == hashlib.sha256(data).hexdigest()
    assert event["address"] == "127.0.0.1"


def test_activity_shows_the_test_upload(
    server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    (tmp_path / "hello.txt").write_text("onboarding test\n")
    sftp_batch(server, alpha_key, "alpha", f"put {tmp_path / 'hello.txt'}\n", check=True)
    server.wait_for_event("file.received", name="hello.txt")
    # The journal is written in the background, a moment after the log line.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        table = server.ingestctl("activity", "alpha").stdout
        if "hello.txt" in table and "auth.success" in table:
            break
        time.sleep(0.2)
    assert "file.received" in table and "hello.txt" in table and "auth.success" in table
    as_json = server.ingestctl("activity", "alpha", "--json").stdout
    assert '"hello.txt"' in as_json
    assert "hello.txt" not in server.ingestctl("activity", "beta").stdout


def test_listing_hides_temp_files_and_server_user_names(
    server: RunningServer, alpha_key: Path
) -> None:
    folder = server.folder("alpha")
    (folder / ".ingest-upload-deadbeef-x.csv").write_text("in flight")
    try:
        result = sftp_batch(server, alpha_key, "alpha", "ls -la\n", check=True)
        assert ".ingest-" not in result.stdout
        assert " root " not in result.stdout
        refused = sftp_batch(server, alpha_key, "alpha", "get .ingest-upload-deadbeef-x.csv\n")
        assert refused.returncode != 0
    finally:
        (folder / ".ingest-upload-deadbeef-x.csv").unlink()


def test_overwrite_replaces_the_whole_file(
    server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    target = server.folder("alpha") / "over.csv"
    target.write_bytes(b"x" * 5000)
    (tmp_path / "over.csv").write_bytes(b"short\n")
    for legacy in (False, True):  # SFTP-mode scp opens without TRUNC and truncates afterwards
        result = subprocess.run(
            [
                *server.scp_command(alpha_key, legacy=legacy),
                str(tmp_path / "over.csv"),
                server.scp_target("alpha", "over.csv"),
            ],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
        )
        assert result.returncode == 0, result.stderr
        assert target.read_bytes() == b"short\n"
        target.write_bytes(b"x" * 5000)


def test_filepart_upload_then_rename(
    server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    """WinSCP's way: upload NAME.filepart, rename to NAME, set the timestamp afterwards."""
    (tmp_path / "data.csv").write_bytes(b"a,b\n1,2\n")
    sftp = paramiko_sftp(server, alpha_key, "alpha")
    try:
        sftp.put(str(tmp_path / "data.csv"), "data.csv.filepart")
        sftp.posix_rename("data.csv.filepart", "data.csv")
        sftp.utime("data.csv", (1_600_000_000, 1_600_000_000))
        (tmp_path / "data2.csv").write_bytes(b"a,b\n3,4\n")
        sftp.put(str(tmp_path / "data2.csv"), "data2.csv.filepart")
        sftp.rename("data2.csv.filepart", "data2.csv")  # plain SFTP v3 rename
    finally:
        sftp.close()
    folder = server.folder("alpha")
    assert (folder / "data.csv").read_bytes() == b"a,b\n1,2\n"
    assert (folder / "data2.csv").read_bytes() == b"a,b\n3,4\n"
    assert not (folder / "data.csv.filepart").exists()
    assert int((folder / "data.csv").stat().st_mtime) == 1_600_000_000
    server.wait_for_event("file.renamed", name="data.csv", old_name="data.csv.filepart")


def test_put_preserving_times(server: RunningServer, alpha_key: Path, tmp_path: Path) -> None:
    source = tmp_path / "timed.txt"
    source.write_text("timed\n")
    os.utime(source, (1_500_000_000, 1_500_000_000))
    sftp_batch(server, alpha_key, "alpha", f"put -p {source}\n", check=True)
    assert int((server.folder("alpha") / "timed.txt").stat().st_mtime) == 1_500_000_000


def test_reput_resumes_at_the_offset(
    server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    full = tmp_path / "resume.bin"
    data = write_random(full, 2 * 1024 * 1024)
    half = tmp_path / "half.bin"
    # The first half on the server differs from the local file: only a real resume at the
    # offset keeps it (a full re-upload would overwrite it).
    half.write_bytes(b"\0" * (len(data) // 2))
    sftp_batch(server, alpha_key, "alpha", f"put {half} resume.bin\n", check=True)
    sftp_batch(server, alpha_key, "alpha", f"reput {full} resume.bin\n", check=True)
    expected = b"\0" * (len(data) // 2) + data[len(data) // 2 :]
    assert (server.folder("alpha") / "resume.bin").read_bytes() == expected
    event = [e for e in server.events("file.received") if e["name"] == "resume.bin"][-1]
    assert event["sha256"] == hashlib.sha256(expected).hexdigest()


def test_remove_is_logged(server: RunningServer, alpha_key: Path, tmp_path: Path) -> None:
    (server.folder("alpha") / "gone.txt").write_text("bye")
    sftp_batch(server, alpha_key, "alpha", "rm gone.txt\n", check=True)
    assert not (server.folder("alpha") / "gone.txt").exists()
    server.wait_for_event("file.removed", name="gone.txt", account="alpha")


def test_download(server: RunningServer, alpha_key: Path, tmp_path: Path) -> None:
    (server.folder("alpha") / "dl.txt").write_text("download me\n")
    sftp_batch(server, alpha_key, "alpha", f"get dl.txt {tmp_path / 'dl.txt'}\n", check=True)
    assert (tmp_path / "dl.txt").read_text() == "download me\n"
    server.wait_for_event("file.download", name="dl.txt", bytes=12)


def test_one_process_on_asyncio_event_loop(tmp_path: Path, alpha_key: Path) -> None:
    """``workers = 1``, ``event_loop = "asyncio"``: sessions in the listener's own process,
    on Python's own loop."""
    from server_harness import add_account, start_server

    settings = {"server": {"event_loop": "asyncio", "workers": 1}}
    running = start_server(tmp_path / "srv", settings)
    try:
        started = running.events("server.started")[-1]
        assert started["event_loop"] == "asyncio" and started["workers"] == 1
        assert running.events("worker.started") == []
        add_account(running, "alpha", alpha_key)
        (tmp_path / "a.txt").write_bytes(b"x" * 300_000)
        sftp_batch(running, alpha_key, "alpha", f"put {tmp_path / 'a.txt'}\n", check=True)
        assert (running.folder("alpha") / "a.txt").read_bytes() == b"x" * 300_000
        assert running.events("file.received")[-1]["pid"] == started["pid"]
    finally:
        assert running.stop() == 0


def test_worker_processes_share_the_uploads(tmp_path: Path, alpha_key: Path) -> None:
    """``workers = 2``: the listener hands sessions to two worker processes, in turn."""
    from server_harness import add_account, start_server

    running = start_server(tmp_path / "srv", {"server": {"workers": 2}})
    try:
        started = running.events("server.started")[-1]
        assert started["workers"] == 2
        workers = {e["pid"] for e in running.events("worker.started")}
        assert len(workers) == 2 and started["pid"] not in workers
        add_account(running, "alpha", alpha_key)
        (tmp_path / "w.txt").write_text("worker\n")
        for i in range(4):
            command = f"put {tmp_path / 'w.txt'} w{i}.txt\n"
            sftp_batch(running, alpha_key, "alpha", command, check=True)
        assert sorted(p.name for p in running.folder("alpha").iterdir()) == [
            f"w{i}.txt" for i in range(4)
        ]
        received = running.events("file.received")
        assert {e["pid"] for e in received} == workers  # both took sessions
    finally:
        assert running.stop() == 0
    assert {e["pid"] for e in running.events("worker.stopped")} == workers
    assert len(running.events("server.stopped")) == 1


def test_first_start_makes_host_keys_and_logs_fingerprints(tmp_path: Path) -> None:
    import json
    import shutil

    from server_harness import _launch, start_server

    running = start_server(tmp_path / "srv", launch=False)
    shutil.rmtree(running.host_key_dir)  # as if `ingestctl init` never ran
    running.process = _launch(running)
    try:
        started = running.events("server.started")[-1]
        assert started["event_loop"] == "uvloop"  # the default ("auto") with uvloop installed
        assert started["workers"] == min(os.cpu_count() or 1, 8)  # the default: one per CPU
        shown = json.loads(running.ingestctl("hostkey", "show", "--json").stdout)
        assert {k["algorithm"]: k["bits"] for k in shown} == {"ssh-ed25519": 256, "ssh-rsa": 4096}
        assert sorted(k["fingerprint"] for k in started["host_keys"]) == sorted(
            k["fingerprint"] for k in shown
        )
        stderr = (running.workdir / "server.stderr").read_text()
        assert all(k["fingerprint"] in stderr for k in shown)
    finally:
        assert running.stop() == 0


def test_the_writing_session_sees_its_file_and_nobody_else_does(
    server: RunningServer, alpha_key: Path
) -> None:
    """sshfs opens a new file, then looks up its final name before closing it: the session
    that writes sees the file (stat, lstat, fstat, its own listing) with the size written so
    far; another session and the loader see nothing until the close."""
    writer = paramiko_sftp(server, alpha_key, "alpha")
    other = paramiko_sftp(server, alpha_key, "alpha")
    try:
        handle = writer.open("in-progress.txt", "wb")
        handle.write(b"x" * 1000)
        handle.flush()
        assert writer.stat("in-progress.txt").st_size == 1000
        assert writer.lstat("in-progress.txt").st_size == 1000
        assert handle.stat().st_size == 1000
        assert "in-progress.txt" in writer.listdir(".")
        with pytest.raises(FileNotFoundError):
            other.stat("in-progress.txt")
        assert "in-progress.txt" not in other.listdir(".")
        assert not (server.folder("alpha") / "in-progress.txt").exists()
        handle.write(b"y" * 24)
        handle.close()
        assert other.stat("in-progress.txt").st_size == 1024
    finally:
        writer.close()
        other.close()
    assert (server.folder("alpha") / "in-progress.txt").read_bytes() == b"x" * 1000 + b"y" * 24
