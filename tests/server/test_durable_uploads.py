"""Durable uploads: the data and then the rename reach the disk before the client hears OK.

A power cut cannot be staged in a test, so this watches the server's system calls with
strace: writeback started as the data arrives (sync_file_range), fsync of the temporary
file before the rename, fsync of the folder after it. With ``fsync_uploads = false`` none of
that happens unless the client asks (OpenSSH ``put -f`` sends fsync@openssh.com).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from server_harness import RunningServer, add_account, sftp_batch, start_server, write_random

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None, reason="strace missing: deploy/install-system-deps.sh"
)

SYSCALLS = "fsync,fdatasync,sync_file_range,rename,renameat,renameat2,openat"


@contextmanager
def traced(running: RunningServer, out: Path) -> Iterator[list[str]]:
    """strace the server process (workers = 1: the sessions run in it) and its threads."""
    assert running.process is not None
    lines: list[str] = []
    pid = str(running.process.pid)
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", f"trace={SYSCALLS}", "-o", str(out), "-p", pid],
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # strace attaches to every thread
        yield lines
    finally:
        time.sleep(0.5)
        tracer.terminate()
        tracer.wait(10)
        lines.extend(out.read_text().splitlines())


def calls_on_upload(lines: list[str], name: str) -> list[str]:
    """The calls about this upload, in order: fds opened for its temp file and its folder."""
    role: dict[str, str] = {}  # fd -> what it was last opened for (numbers are reused)
    events = []
    for line in lines:
        opened = re.search(r'openat\(AT_FDCWD, "([^"]+)", ([^)]*)\) = (\d+)', line)
        if opened:
            path, flags, fd = opened.groups()
            # Temporary names do not carry the final name: one upload per traced session.
            if "/.ingest-upload-" in path and "O_CREAT" in flags:
                role[fd] = "file"
            elif "O_DIRECTORY" in flags and path.endswith("/alpha"):
                role[fd] = "folder"
            else:
                role.pop(fd, None)
            continue
        call = re.search(r"(fsync|fdatasync|sync_file_range)\((\d+)", line)
        if call and call.group(2) in role:
            events.append(f"{call.group(1)} {role[call.group(2)]}")
        elif "rename" in line and f'/{name}"' in line and "= 0" in line:
            events.append("rename")
    return events


def test_upload_is_on_disk_before_the_client_hears_ok(tmp_path: Path, alpha_key: Path) -> None:
    running = start_server(tmp_path / "srv", {"server": {"workers": 1}})
    try:
        add_account(running, "alpha", alpha_key)
        write_random(tmp_path / "big.bin", 20 * 1024 * 1024)
        with traced(running, tmp_path / "strace.out") as lines:
            sftp_batch(running, alpha_key, "alpha", f"put {tmp_path / 'big.bin'}\n", check=True)
        sent = (tmp_path / "big.bin").read_bytes()
        assert (running.folder("alpha") / "big.bin").read_bytes() == sent
        events = calls_on_upload(lines, "big.bin")
        assert events.count("sync_file_range file") >= 2  # writeback started on the way
        tail = [e for e in events if e != "sync_file_range file"]
        assert tail == ["fsync file", "rename", "fsync folder"], events
    finally:
        assert running.stop() == 0


def test_without_fsync_uploads_only_the_clients_request_syncs(
    tmp_path: Path, alpha_key: Path
) -> None:
    running = start_server(tmp_path / "srv", {"server": {"workers": 1, "fsync_uploads": False}})
    try:
        add_account(running, "alpha", alpha_key)
        write_random(tmp_path / "a.bin", 3 * 1024 * 1024)
        with traced(running, tmp_path / "plain.out") as plain:
            sftp_batch(running, alpha_key, "alpha", f"put {tmp_path / 'a.bin'}\n", check=True)
        assert calls_on_upload(plain, "a.bin") == ["rename"]
        with traced(running, tmp_path / "asked.out") as asked:
            command = f"put -f {tmp_path / 'a.bin'} b.bin\n"
            sftp_batch(running, alpha_key, "alpha", command, check=True)
        # The client's fsync, then the commit it made durable.
        expected = ["fsync file", "fsync file", "rename", "fsync folder"]
        assert calls_on_upload(asked, "b.bin") == expected
    finally:
        assert running.stop() == 0
