"""One authenticated client can never starve the others.

Against a real server process (one session process, so every session shares its event loop
and its memory), an account misbehaves with real clients and raw SFTP requests; each test
then checks the effect on the server and that another account, from another address, still
logs in, lists, uploads and downloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import paramiko
import pytest
from server_harness import (
    RunningServer,
    add_account,
    login,
    memory_kib,
    paramiko_sftp,
    sftp_batch,
    start_server,
    temp_files,
    wait_until,
    write_random,
)

BETA_ADDRESS = "127.0.0.3"
HANDLES = 64
UNFLUSHED = 1024 * 1024


def two_account_server(
    workdir: Path, alpha_key: Path, beta_key: Path, server: dict, limits: dict
) -> RunningServer:
    """alpha on 127.0.0.1 and beta on its own address; the defender and the connection rate
    are off (these tests connect fast and fail on purpose)."""
    running = start_server(
        workdir,
        {
            "server": server,
            "limits": {
                "max_connections_per_address": 20,
                "connection_rate_per_address": 0,
                "free_disk_reserve_bytes": 0,
                **limits,
            },
            "defender": {"enabled": False},
        },
    )
    add_account(running, "alpha", alpha_key)
    add_account(running, "beta", beta_key, ips=(BETA_ADDRESS,))
    return running


@pytest.fixture(scope="module")
def budgets(
    tmp_path_factory: pytest.TempPathFactory, alpha_key: Path, beta_key: Path
) -> Iterator[RunningServer]:
    running = two_account_server(
        tmp_path_factory.mktemp("budgets"),
        alpha_key,
        beta_key,
        server={"workers": 1, "max_channels_per_connection": 3},
        limits={
            "max_handles_per_session": HANDLES,
            "max_unflushed_bytes_per_session": UNFLUSHED,
            "max_sessions_per_account": 3,
        },
    )
    (running.folder("alpha") / "sis_loader.log").write_text("2026-12-01T03:00:00 NO FILE\n")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def quota(
    tmp_path_factory: pytest.TempPathFactory, alpha_key: Path, beta_key: Path
) -> Iterator[RunningServer]:
    running = two_account_server(
        tmp_path_factory.mktemp("quota"),
        alpha_key,
        beta_key,
        server={"workers": 2},
        limits={"account_quota_bytes": 50_000_000, "max_file_bytes": 20_000_000},
    )
    yield running
    running.stop()


def another_account_works(running: RunningServer, beta_key: Path, tmp_path: Path) -> None:
    """beta, from its own address: logs in, lists, uploads and downloads, byte for byte."""
    data = b"beta still works\n" * 100
    sftp = paramiko_sftp(running, beta_key, "beta", bind=BETA_ADDRESS)
    try:
        sftp.listdir(".")
        with sftp.open("beta-check.txt", "wb") as handle:
            handle.write(data)
        with sftp.open("beta-check.txt", "rb") as handle:
            assert handle.read() == data
    finally:
        sftp.close()


def folder_bytes(folder: Path) -> int:
    """Everything stored in an account folder, uploads in flight included."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def server_pid(running: RunningServer) -> int:
    assert running.process is not None
    return running.process.pid


# -- handles, channels, sessions ----------------------------------------------------------


def test_open_handles_per_session_are_bounded(
    budgets: RunningServer, alpha_key: Path, beta_key: Path, tmp_path: Path
) -> None:
    sftp = paramiko_sftp(budgets, alpha_key)
    try:
        held = [sftp.open("sis_loader.log", "rb") for _ in range(HANDLES)]
        with pytest.raises(
            OSError, match=f"too many open files in this session: at most {HANDLES}"
        ):
            sftp.open("sis_loader.log", "rb")
        with pytest.raises(OSError, match="too many open files"):
            sftp.listdir(".")  # a folder handle is a handle too
        another_account_works(budgets, beta_key, tmp_path)
        held.pop().close()
        held.append(sftp.open("sis_loader.log", "rb"))  # one closed, one may open
    finally:
        sftp.close()
    again = paramiko_sftp(budgets, alpha_key)  # a new session starts with its whole allowance
    try:
        handles = [again.open("sis_loader.log", "rb") for _ in range(HANDLES)]
        assert len(handles) == HANDLES
    finally:
        again.close()


def test_channels_per_connection_are_bounded(budgets: RunningServer, alpha_key: Path) -> None:
    transport = login(budgets, alpha_key)
    try:
        channels = [transport.open_session(timeout=20) for _ in range(3)]
        with pytest.raises(paramiko.ChannelException) as refused:
            transport.open_session(timeout=20)
        assert refused.value.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        budgets.wait_for_event(
            "channel.refused", request="session beyond max_channels_per_connection"
        )
        channels.pop().close()
        wait_until(lambda: _can_open(transport), 20, "a channel slot given back")
    finally:
        transport.close()


def _can_open(transport: paramiko.Transport) -> bool:
    try:
        transport.open_session(timeout=20).close()
    except paramiko.ChannelException:
        return False
    return True


def test_sessions_per_account_are_bounded(
    budgets: RunningServer, alpha_key: Path, beta_key: Path, tmp_path: Path
) -> None:
    sessions = [paramiko_sftp(budgets, alpha_key) for _ in range(3)]
    try:
        with pytest.raises(paramiko.ChannelException):
            paramiko_sftp(budgets, alpha_key)
        refused = sftp_batch(budgets, alpha_key, "alpha", "ls\n", extra=("-o", "LogLevel=INFO"))
        assert refused.returncode != 0
        assert "too many sessions for this account: at most 3 at once" in refused.stderr
        another_account_works(budgets, beta_key, tmp_path)
        sessions.pop().close()
        wait_until(lambda: _sftp_opens(budgets, alpha_key), 20, "a session slot given back")
    finally:
        for sftp in sessions:
            sftp.close()


def _sftp_opens(running: RunningServer, key: Path) -> bool:
    try:
        paramiko_sftp(running, key).close()
    except paramiko.ChannelException:
        return False
    return True


# -- memory ---------------------------------------------------------------------------------


def test_unflushed_upload_bytes_are_bounded_per_session(
    budgets: RunningServer, alpha_key: Path, beta_key: Path, tmp_path: Path
) -> None:
    """Three sessions each hold 64 uploads with 480 KiB written to each (below the 512 KiB
    write batch): 90 MiB that a server buffering per file would keep in memory."""
    pid = server_pid(budgets)
    baseline = memory_kib(pid, "VmRSS") * 1024
    block = b"m" * 32 * 1024
    sessions = [paramiko_sftp(budgets, alpha_key) for _ in range(3)]
    try:
        files = []
        for s, sftp in enumerate(sessions):
            for i in range(HANDLES):
                handle = sftp.open(f"mem-{s}-{i}.bin", "wb")
                for _ in range(15):
                    handle.write(block)
                files.append(handle)
        peak = memory_kib(pid, "VmHWM") * 1024
        another_account_works(budgets, beta_key, tmp_path)
        for handle in files:
            handle.close()
    finally:
        for sftp in sessions:
            sftp.close()
    growth = peak - baseline
    held_by_clients = 3 * HANDLES * 15 * len(block)
    print(f"server grew by {growth >> 20} MiB while clients held {held_by_clients >> 20} MiB")
    assert growth < held_by_clients // 2, f"server grew by {growth >> 20} MiB"
    assert (budgets.folder("alpha") / "mem-2-63.bin").stat().st_size == 15 * len(block)
    for path in budgets.folder("alpha").glob("mem-*.bin"):
        path.unlink()


# -- the quota ------------------------------------------------------------------------------


def test_quota_holds_for_many_uploads_in_one_session(
    quota: RunningServer, alpha_key: Path, beta_key: Path, tmp_path: Path
) -> None:
    folder = quota.folder("alpha")
    block = b"q" * 32 * 1024
    sftp = paramiko_sftp(quota, alpha_key)
    refused = 0
    try:
        handles = [sftp.open(f"many-{i}.bin", "wb") for i in range(10)]
        for handle in handles:
            try:
                for _ in range(20_000_000 // len(block)):
                    handle.write(block)
            except OSError as exc:  # the quota, what the folder holds, what was needed
                assert "account quota exceeded: the folder may hold at most 50000000" in str(exc)
                assert "it holds" in str(exc) and "this upload needs" in str(exc)
                refused += 1
            assert folder_bytes(folder) <= 50_000_000
        for handle in handles:
            with contextlib.suppress(OSError):  # the refused ones say so again
                handle.close()
        assert folder_bytes(folder) <= 50_000_000
        for name in sftp.listdir("."):  # removed through the server: the ledger hears it
            sftp.remove(name)
    finally:
        sftp.close()
    assert refused >= 7
    wait_until(lambda: temp_files(folder) == [], 20, "refused uploads removed")
    another_account_works(quota, beta_key, tmp_path)


def test_quota_holds_across_parallel_sessions_and_workers(
    quota: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    folder = quota.folder("alpha")
    source = tmp_path / "part.bin"
    write_random(source, 19_000_000)
    results: list[str] = []

    def push(i: int) -> None:
        try:
            sftp = paramiko_sftp(quota, alpha_key)
            try:
                sftp.put(str(source), f"parallel-{i}.bin")
                results.append("stored")
            finally:
                sftp.close()
        except OSError as exc:
            results.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=push, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    # 2 x 19 MB fit in 50 MB, a third does not. Racing uploads each hold what they have
    # written so far: when all six advance evenly they fill the quota together and every one
    # is refused (none may complete past it); at most two can ever be stored.
    assert results.count("stored") <= 2, results
    # Every other upload was refused (paramiko reports a refused pipelined upload either with
    # the server's quota message or, when its close races the refusal, as a missing file).
    assert len(results) == 6, results
    assert any("account quota exceeded" in r for r in results), results
    assert folder_bytes(folder) <= 50_000_000
    sftp = paramiko_sftp(quota, alpha_key)
    try:
        for name in sftp.listdir("."):
            sftp.remove(name)
    finally:
        sftp.close()


def test_copy_data_counts_against_the_quota(
    quota: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    """The copy-data extension writes without the client sending the bytes."""
    folder = quota.folder("alpha")
    source = tmp_path / "source.bin"
    write_random(source, 2_600_000)

    async def copy_until_refused() -> str:
        async with (
            asyncssh.connect(
                quota.host, quota.port, username="alpha", client_keys=[str(alpha_key)],
                known_hosts=None, agent_path=None,
            ) as conn,
            conn.start_sftp_client() as sftp,
        ):  # fmt: skip
            await sftp.put(str(source), "source.bin")
            for i in range(80):
                try:
                    await sftp.copy("source.bin", f"copy-{i}.bin", remote_only=True)
                except asyncssh.SFTPError as exc:
                    return exc.reason
        return "never refused"

    reason = asyncio.run(asyncio.wait_for(copy_until_refused(), 120))
    assert "account quota exceeded" in reason
    assert folder_bytes(folder) <= 50_000_000
    for path in [*folder.glob("copy-*.bin"), folder / "source.bin"]:
        path.unlink(missing_ok=True)


# -- the event loop -------------------------------------------------------------------------


def test_a_resume_of_a_big_file_does_not_stall_other_sessions(
    budgets: RunningServer, alpha_key: Path, beta_key: Path
) -> None:
    """Resuming (writing at the end of an existing file opened without TRUNC) copies the
    existing file. While that runs, another session on the same process is answered: its
    requests complete before the resumed write's reply, which could not happen if the copy
    ran on the event loop."""
    big = budgets.folder("alpha") / "resume-me.bin"
    size = 300 * 1024 * 1024
    write_random(big, size)
    order: list[str] = []

    async def scenario() -> None:
        options = {"known_hosts": None, "agent_path": None, "port": budgets.port}
        async with (
            asyncssh.connect(
                budgets.host, username="alpha", client_keys=[str(alpha_key)], **options
            ) as resumer,
            asyncssh.connect(
                budgets.host, username="beta", client_keys=[str(beta_key)],
                local_addr=(BETA_ADDRESS, 0), **options,
            ) as other,
            resumer.start_sftp_client() as resumer_sftp,
            other.start_sftp_client() as other_sftp,
        ):  # fmt: skip

            async def resume() -> None:
                async with resumer_sftp.open("resume-me.bin", "r+b") as handle:
                    await handle.write(b"tail", size)
                order.append("resume")

            async def poke() -> None:
                for _ in range(200):
                    await other_sftp.listdir(".")
                    order.append("other")
                    if "resume" in order:
                        return

            await asyncio.gather(resume(), poke())

    asyncio.run(asyncio.wait_for(scenario(), 120))
    first_resume = order.index("resume")
    assert first_resume > 0 and order[:first_resume].count("other") >= 1, order[:5]
    assert big.stat().st_size == size + 4
    big.unlink()


# -- file names and metadata ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (b"\xff\xfe-x.txt", "not valid UTF-8"),
        ("fake\u2028LOADED.txt".encode(), "control character"),
        (b"a\x1b[31m.txt", "control character"),
        (b"line\nbreak.txt", "control character"),
        (b"SIS_LOADER.LOG", "sis_loader.log"),
        (b"sis_loader.log ", "sis_loader.log"),
    ],
)
def test_names_that_could_break_or_forge_something_are_refused(
    budgets: RunningServer, alpha_key: Path, name: bytes, reason: str
) -> None:
    sftp = paramiko_sftp(budgets, alpha_key)
    try:
        with pytest.raises(OSError, match=reason):
            sftp.open(name, "wb")  # type: ignore[arg-type]
        with sftp.open("rename-me.txt", "wb") as handle:
            handle.write(b"x")
        with pytest.raises(OSError, match=reason):
            sftp.posix_rename("rename-me.txt", name)  # type: ignore[arg-type]
    finally:
        sftp.close()
    assert not any(p.name.encode(errors="surrogateescape") == name
                   for p in budgets.folder("alpha").iterdir())  # fmt: skip


def test_a_name_of_255_bytes_can_be_uploaded(budgets: RunningServer, alpha_key: Path) -> None:
    name = "n" * 251 + ".txt"
    sftp = paramiko_sftp(budgets, alpha_key)
    try:
        with sftp.open(name, "wb") as handle:
            handle.write(b"long name")
    finally:
        sftp.close()
    assert (budgets.folder("alpha") / name).read_bytes() == b"long name"


def test_odd_times_and_holes_never_break_a_listing(
    budgets: RunningServer, alpha_key: Path, beta_key: Path, tmp_path: Path
) -> None:
    folder = budgets.folder("alpha")
    transport = login(budgets, alpha_key)
    try:
        channel = transport.open_session(timeout=20)
        channel.exec_command("scp -t .")  # legacy SCP sink, fed by hand
        assert channel.recv(1) == b"\0"
        channel.sendall(b"T-5 0 -5 0\n")
        assert channel.recv(1) == b"\0"
        channel.sendall(b"C0644 3 negative-time.txt\n")
        assert channel.recv(1) == b"\0"
        channel.sendall(b"abc\0")
        assert channel.recv(1) == b"\0"
        channel.close()
    finally:
        transport.close()
    wait_until(lambda: (folder / "negative-time.txt").exists(), 20, "the SCP upload")
    assert (folder / "negative-time.txt").stat().st_mtime >= 0
    os.utime(folder / "negative-time.txt", (-5, -5))  # as an operator's copy could leave it
    sftp = paramiko_sftp(budgets, alpha_key)
    try:
        listed = {a.filename: a for a in sftp.listdir_attr(".")}
        assert listed["negative-time.txt"].st_mtime == 0
        assert sftp.stat("negative-time.txt").st_mtime == 0
        with sftp.open("hole.bin", "wb") as handle:
            handle.seek(2**31 - 1)
            with pytest.raises(OSError, match="bytes past the end of the file"):
                handle.write(b"x")
                handle.flush()
        with pytest.raises(OSError) as odd:
            sftp.stat("nul\0byte.txt")
        assert "null" not in str(odd.value) and "Uncaught" not in str(odd.value)
    finally:
        sftp.close()
    assert not (folder / "hole.bin").exists()
    another_account_works(budgets, beta_key, tmp_path)


# -- logs -------------------------------------------------------------------------------------


def test_repeated_downloads_are_logged_once_with_a_count(
    budgets: RunningServer, alpha_key: Path
) -> None:
    before = len(budgets.events("file.download"))
    sftp = paramiko_sftp(budgets, alpha_key)
    try:
        for _ in range(50):
            sftp.open("sis_loader.log", "rb").close()
        wait_until(lambda: len(budgets.events("file.download")) > before, 20, "first download")
        assert len(budgets.events("file.download")) == before + 1
    finally:
        sftp.close()
    budgets.wait_for_event("file.download", repeated=49)
    assert len(budgets.events("file.download")) == before + 2


# -- idle connections -------------------------------------------------------------------------


def test_an_idle_logged_in_connection_is_closed(
    tmp_path: Path, alpha_key: Path, beta_key: Path
) -> None:
    running = two_account_server(
        tmp_path / "idle",
        alpha_key,
        beta_key,
        server={"workers": 1, "idle_timeout": 2.0},
        limits={},
    )
    try:
        transport = login(running, alpha_key)  # logged in, no channel
        try:
            event = running.wait_for_event("session.idle_closed", timeout=30, account="alpha")
            assert event["channels"] == 0
            wait_until(lambda: not transport.is_active(), 20, "the connection closed")
        finally:
            transport.close()
        sftp = paramiko_sftp(running, alpha_key)  # a channel, then no request
        try:
            running.wait_for_event("session.idle_closed", timeout=30, channels=1)
        finally:
            sftp.close()
        another_account_works(running, beta_key, tmp_path)
    finally:
        running.stop()
