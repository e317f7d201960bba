"""rclone and sshfs, driven for real against the server (part of the client matrix).

rclone (Debian 12: 1.60) runs with its DEFAULT settings: concurrent writes, modification
times set after the upload. Its pkg/sftp frames the last WRITE of every file with bytes
after the data, which OpenSSH ignores and asyncssh refuses (``ingest_server.sftp_compat``).

sshfs (3.7) mounts the account folder through FUSE: it opens a new file and looks up its
final name before closing it, sets times by path (``cp -p``, ``touch``) while the file is
still open, and closes files asynchronously (the kernel's RELEASE comes after ``cp`` has
returned), so what lands on the server is waited for, not assumed. Skipped, with the reason
printed (-ra), where the binary or FUSE is missing.

Both are Debian packages (rclone, sshfs) that ``deploy/install-system-deps.sh`` installs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import CLIENT_TIMEOUT, RunningServer, temp_files, wait_until, write_random

pytestmark = pytest.mark.clients

# Not multiples of 32 KiB: the last WRITE of each is short, as a real file's is.
UPLOAD_SIZES = (100_000, 1_000_003)


def need(binary: str, package: str) -> str:
    found = shutil.which(binary)
    if found is None:
        pytest.skip(f"{binary} is not installed (apt-get install {package})")
    return found


def landed(folder: Path, name: str, data: bytes) -> bool:
    try:
        return (folder / name).read_bytes() == data
    except FileNotFoundError:
        return False


def received_bytes(server: RunningServer, name: str) -> list[int]:
    return [e["bytes"] for e in server.events("file.received") if e.get("name") == name]


# -- rclone ---------------------------------------------------------------------------------


def rclone(
    server: RunningServer, key: Path, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """rclone with a remote ``ingest:`` for account alpha, defined only by environment
    variables (no config file read or written), the host key pinned from `hostkey show`."""
    binary = need("rclone", "rclone")
    env = {
        **os.environ,
        "RCLONE_CONFIG": str(tmp_path / "rclone.conf"),  # absent: nothing of the user's
        "RCLONE_CONFIG_INGEST_TYPE": "sftp",
        "RCLONE_CONFIG_INGEST_HOST": server.host,
        "RCLONE_CONFIG_INGEST_PORT": str(server.port),
        "RCLONE_CONFIG_INGEST_USER": "alpha",
        "RCLONE_CONFIG_INGEST_KEY_FILE": str(key),
        "RCLONE_CONFIG_INGEST_KNOWN_HOSTS_FILE": str(server.known_hosts),
        # No remote shell (rclone would run `echo`/`md5sum` to probe one: refused here).
        "RCLONE_CONFIG_INGEST_SHELL_TYPE": "none",
    }
    return subprocess.run(
        [binary, "--retries", "1", "--low-level-retries", "1", "--contimeout", "10s",
         "--timeout", "30s", *args],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize("size", UPLOAD_SIZES)
def test_rclone_default_upload_download_and_listing(
    server: RunningServer, alpha_key: Path, tmp_path: Path, size: int
) -> None:
    folder = server.folder("alpha")
    name = f"from-rclone-{size}.bin"
    source = tmp_path / "up" / name
    source.parent.mkdir()
    data = write_random(source, size)
    os.utime(source, (1_700_000_000, 1_700_000_000))

    up = rclone(server, alpha_key, tmp_path, "copyto", str(source), f"ingest:{name}")
    assert up.returncode == 0, up.stderr
    assert (folder / name).read_bytes() == data
    assert int((folder / name).stat().st_mtime) == 1_700_000_000  # rclone sets it by default
    assert temp_files(folder) == []
    assert received_bytes(server, name) == [size]

    listing = rclone(server, alpha_key, tmp_path, "lsf", "ingest:")
    assert listing.returncode == 0, listing.stderr
    assert name in listing.stdout.splitlines()

    down = tmp_path / "down"
    got = rclone(server, alpha_key, tmp_path, "copy", f"ingest:{name}", str(down))
    assert got.returncode == 0, got.stderr
    assert (down / name).read_bytes() == data


# -- sshfs ----------------------------------------------------------------------------------


def _fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


@pytest.fixture(scope="module")
def mounted(
    server: RunningServer, alpha_key: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Account alpha's folder mounted with sshfs (default caching, as a user would)."""
    sshfs = need("sshfs", "sshfs")
    fusermount = _fusermount()
    if fusermount is None:
        pytest.skip("fusermount3/fusermount is not installed (apt-get install fuse3)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("FUSE is not available here: /dev/fuse is missing")
    mount = tmp_path_factory.mktemp("sshfs") / "mnt"
    mount.mkdir()
    options = ",".join([
        f"IdentityFile={alpha_key}", "IdentitiesOnly=yes", "IdentityAgent=none",
        "BatchMode=yes", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null",
        "LogLevel=ERROR", "ConnectTimeout=10", f"port={server.port}",
    ])  # fmt: skip
    result = subprocess.run(
        [sshfs, "-o", options, f"alpha@{server.host}:/", str(mount)],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if result.returncode != 0 and "fuse" in result.stderr.lower():
        pytest.skip(f"FUSE mounts are not permitted here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    try:
        yield mount
    finally:
        done = subprocess.run([fusermount, "-u", str(mount)], capture_output=True, timeout=30)
        if done.returncode != 0:  # something still busy: detach it, never leave a mount
            subprocess.run([fusermount, "-u", "-z", str(mount)], capture_output=True, timeout=30)


def cp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["cp", *map(str, args)], capture_output=True, text=True, timeout=CLIENT_TIMEOUT
    )


@pytest.mark.parametrize("size", (*UPLOAD_SIZES, 0))
def test_sshfs_cp_in_lands_byte_exact_and_lists(
    server: RunningServer, mounted: Path, tmp_path: Path, size: int
) -> None:
    folder = server.folder("alpha")
    name = f"from-sshfs-{size}.bin"
    source = tmp_path / name
    data = write_random(source, size)  # size 0: the client really writes an empty file
    done = cp(source, mounted / name)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: received_bytes(server, name) == [size], what=f"{name} received")
    assert (folder / name).read_bytes() == data
    assert os.stat(mounted / name).st_size == size
    assert name in os.listdir(mounted)
    assert (mounted / name).read_bytes() == data
    assert temp_files(folder) == []
    discarded = [e for e in server.events("upload.discarded") if e.get("name") == name]
    assert discarded == []


def test_sshfs_cp_over_an_existing_file_and_mv(
    server: RunningServer, mounted: Path, tmp_path: Path
) -> None:
    folder = server.folder("alpha")
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first_data = write_random(first, 200_000)
    second_data = write_random(second, 5_000)
    assert cp(first, mounted / "replaced.bin").returncode == 0
    wait_until(lambda: landed(folder, "replaced.bin", first_data), what="first version")
    done = cp(second, mounted / "replaced.bin")  # shorter: the old tail must not survive
    assert done.returncode == 0, done.stderr
    wait_until(lambda: landed(folder, "replaced.bin", second_data), what="second version")

    os.rename(mounted / "replaced.bin", mounted / "moved.bin")
    assert (folder / "moved.bin").read_bytes() == second_data
    assert not (folder / "replaced.bin").exists()
    assert "moved.bin" in os.listdir(mounted)
    assert cp(first, mounted / "over.bin").returncode == 0
    wait_until(lambda: landed(folder, "over.bin", first_data), what="over.bin")
    os.rename(mounted / "moved.bin", mounted / "over.bin")  # onto an existing name
    assert (folder / "over.bin").read_bytes() == second_data
    os.remove(mounted / "over.bin")
    assert not (folder / "over.bin").exists()
    assert temp_files(folder) == []


def test_sshfs_reads_the_log_but_cannot_change_it(server: RunningServer, mounted: Path) -> None:
    folder = server.folder("alpha")
    line = "2026-01-05T03:00:12-05:00 LOADED sis_hr_user_info.txt 1200 rows\n"
    (folder / "sis_loader.log").write_text(line, encoding="utf-8")
    assert (mounted / "sis_loader.log").read_text(encoding="utf-8") == line
    with pytest.raises(PermissionError):
        (mounted / "sis_loader.log").write_text("forged\n", encoding="utf-8")
    assert (folder / "sis_loader.log").read_text(encoding="utf-8") == line


def test_sshfs_sets_times_of_a_file_it_is_still_writing(
    server: RunningServer, mounted: Path, tmp_path: Path
) -> None:
    """`cp -p` and `touch` set times with SETSTAT by path while sshfs still holds the new
    file open: the times belong to that upload, and the client hears no error."""
    folder = server.folder("alpha")
    source = tmp_path / "kept-times.bin"
    data = write_random(source, 70_000)
    os.utime(source, (1_600_000_000, 1_600_000_000))
    done = cp("-p", source, mounted / "kept-times.bin")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: landed(folder, "kept-times.bin", data), what="kept-times.bin")
    wait_until(lambda: int((folder / "kept-times.bin").stat().st_mtime) == 1_600_000_000,
               timeout=5, what="the preserved time")  # fmt: skip

    touched = subprocess.run(["touch", str(mounted / "touched.txt")], capture_output=True,
                             text=True, timeout=CLIENT_TIMEOUT)  # fmt: skip
    assert touched.returncode == 0, touched.stderr
    wait_until(lambda: landed(folder, "touched.txt", b""), what="touched.txt")

    dated = subprocess.run(["touch", "-d", "2021-03-04 05:06:07Z", str(mounted / "kept-times.bin")],
                           capture_output=True, text=True, timeout=CLIENT_TIMEOUT)  # fmt: skip
    assert dated.returncode == 0, dated.stderr
    wait_until(lambda: int((folder / "kept-times.bin").stat().st_mtime) == 1_614_834_367,
               timeout=5, what="the time set by touch -d")  # fmt: skip
    assert (folder / "kept-times.bin").read_bytes() == data
    assert temp_files(folder) == []
