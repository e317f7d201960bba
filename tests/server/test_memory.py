"""Bounded memory: a client asking for a whole file at once must not make the server queue it.

paramiko's get() requests the whole file up front. The server serves reads only while the
channel's unsent data stays under limits.max_read_ahead_bytes (8 MiB), so its peak resident
memory grows by a few tens of MB at most. The issue asks for a 1 GiB file; 256 MiB keeps
this test near ten seconds and is already far above what an unbounded server would queue
within the limit (bare asyncssh grew by about the file size).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import paramiko
import pytest
from server_harness import RunningServer, memory_kib

SIZE = 256 * 1024 * 1024
ALLOWED_GROWTH = 48 * 1024 * 1024


@pytest.mark.slow
def test_paramiko_get_of_a_big_file_keeps_server_memory_bounded(
    server: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    source = server.folder("alpha") / "big-download.bin"
    digest = hashlib.sha256()
    block = bytes(range(256)) * 4096  # 1 MiB, varied
    with open(source, "wb") as handle:
        for i in range(SIZE // len(block)):
            chunk = i.to_bytes(4, "big") + block[4:]
            handle.write(chunk)
            digest.update(chunk)
    assert server.process is not None
    pid = server.process.pid
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(
        server.host, server.port, username="alpha", key_filename=str(alpha_key),
        look_for_keys=False, allow_agent=False,
    )  # fmt: skip
    try:
        baseline = memory_kib(pid, "VmRSS") * 1024
        target = tmp_path / "got.bin"
        client.open_sftp().get("big-download.bin", str(target))
        peak = memory_kib(pid, "VmHWM") * 1024
    finally:
        client.close()
    received = hashlib.sha256()
    with open(target, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            received.update(chunk)
    assert received.hexdigest() == digest.hexdigest()
    growth = peak - baseline
    print(f"server RSS before {baseline >> 20} MiB, peak {peak >> 20} MiB")
    assert growth < ALLOWED_GROWTH, f"server grew by {growth >> 20} MiB"
    source.unlink()
