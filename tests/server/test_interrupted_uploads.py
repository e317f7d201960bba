"""Uploads that never complete leave neither a final file nor a temporary one.

The client is killed with SIGKILL (with its ssh child) in the middle of a 50 MB upload,
throttled with -l so there is a middle to kill it in. An earlier file of the same name must
survive untouched.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from server_harness import (
    RunningServer,
    add_account,
    kill_group,
    start_server,
    temp_files,
    wait_until,
    write_random,
)

SIZE = 50 * 1024 * 1024
THROTTLE_KBIT = "40000"  # 5 MB/s: ten seconds for the whole file


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.csv"
    write_random(path, SIZE)
    return path


def upload_command(server: RunningServer, key: Path, tool: str, source: Path) -> list[str]:
    if tool == "sftp":
        return [
            *server.sftp_command(key, "alpha")[:1],
            "-l", THROTTLE_KBIT, "-b", "-",
            *server.sftp_command(key, "alpha")[1:],
        ]  # fmt: skip
    scp = server.scp_command(key, legacy=tool == "scp-O")
    target = server.scp_target("alpha", "big.csv")
    return [scp[0], "-l", THROTTLE_KBIT, *scp[1:], str(source), target]


def start_upload(server: RunningServer, key: Path, tool: str, source: Path) -> subprocess.Popen:
    return subprocess.Popen(
        upload_command(server, key, tool, source),
        stdin=subprocess.PIPE if tool == "sftp" else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for_partial_upload(folder: Path) -> None:
    def partial() -> bool:
        temps = [folder / n for n in temp_files(folder)]
        return any(p.exists() and p.stat().st_size > 1024 * 1024 for p in temps)

    wait_until(partial, what="a partial upload in a temporary file")


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["sftp", "scp", "scp-O"])
def test_client_killed_mid_upload(
    server: RunningServer, alpha_key: Path, big_file: Path, tool: str
) -> None:
    folder = server.folder("alpha")
    (folder / "big.csv").write_text("the earlier, complete file\n")
    before = len(server.events("upload.discarded"))
    client = start_upload(server, alpha_key, tool, big_file)
    if tool == "sftp":
        assert client.stdin is not None
        client.stdin.write(f"put {big_file} big.csv\n".encode())
        client.stdin.flush()
    wait_for_partial_upload(folder)
    kill_group(client)
    wait_until(lambda: len(server.events("upload.discarded")) > before, what="upload.discarded")
    assert temp_files(folder) == []
    assert (folder / "big.csv").read_text() == "the earlier, complete file\n"
    event = server.events("upload.discarded")[-1]
    assert event["name"] == "big.csv"
    assert event["protocol"] == ("scp" if tool == "scp-O" else "sftp")
    assert not [e for e in server.events("file.received") if e["name"] == "big.csv"]


@pytest.mark.slow
@pytest.mark.parametrize("signalled", ["listener", "every process"])
def test_sigterm_lets_short_uploads_finish_and_cuts_long_ones(
    tmp_path: Path, alpha_key: Path, big_file: Path, signalled: str
) -> None:
    running = start_server(tmp_path / "srv", {"server": {"shutdown_grace": 5.0, "workers": 2}})
    add_account(running, "alpha", alpha_key)
    small = tmp_path / "small.csv"
    small_data = write_random(small, 2 * 1024 * 1024)
    folder = running.folder("alpha")
    long_upload = start_upload(running, alpha_key, "scp", big_file)
    wait_for_partial_upload(folder)
    # 2 MB/s: about a second, well inside the grace period.
    short_upload = subprocess.Popen(
        [
            *running.scp_command(alpha_key)[:1],
            "-l",
            "16000",
            *running.scp_command(alpha_key)[1:],
            str(small),
            running.scp_target("alpha", "small.csv"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_until(lambda: len(temp_files(folder)) == 2, what="both uploads in flight")
    assert running.process is not None
    targets = [running.process.pid]
    if signalled == "every process":  # what systemd's default KillMode=control-group does
        targets += [e["pid"] for e in running.events("worker.started")]
    for pid in targets:
        os.kill(pid, signal.SIGTERM)
    assert running.stop() == 0
    assert short_upload.wait(30) == 0
    long_upload.wait(30)
    assert (folder / "small.csv").read_bytes() == small_data
    assert not (folder / "big.csv").exists()
    assert temp_files(folder) == []
    assert running.events("server.stopped")
    cut = running.events("upload.discarded")
    assert [e["name"] for e in cut] == ["big.csv"]


def test_temporary_files_of_a_killed_server_are_removed_when_it_starts(
    tmp_path: Path, alpha_key: Path
) -> None:
    """A server killed mid-upload leaves the hidden temporary file; the next start of the same
    node removes it whatever its age (and only its own: tests/server/test_nodes.py)."""
    running = start_server(tmp_path / "srv", {"cluster": {"node_id": "this-node"}}, launch=False)
    add_account(running, "alpha", alpha_key)
    folder = running.folder("alpha")
    own, unknown = folder / ".ingest-upload-this-node-4242-0a", folder / ".ingest-upload-b.csv"
    own.write_bytes(b"x" * 1000)
    unknown.write_bytes(b"y")
    running.restart()
    try:
        assert running.events("server.started")[-1]["own_leftover_uploads_removed"] == 1
        assert temp_files(folder) == [unknown.name]
    finally:
        running.stop()
