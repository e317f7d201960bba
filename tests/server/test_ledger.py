"""The account ledger: sessions per account and quota reservations, server-wide.

``LocalLedger`` on real account folders; ``RemoteLedger`` against a ``LedgerService`` over a
real SOCK_SEQPACKET pair and the real ``ControlChannel`` (what a worker and the listener
run), including a worker that dies holding sessions and reservations and a listener that
does not answer.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from ingest_core.folders import account_folder
from ingest_core.settings import Settings, settings_from_mapping
from ingest_server import ledger as ledger_module
from ingest_server.ledger import LedgerService, LocalLedger, RemoteLedger, account_usage
from ingest_server.worker_channel import ControlChannel, Message


def make_settings(tmp_path: Path, **limits: Any) -> Settings:
    return settings_from_mapping(
        {"data_root": "var", "log_dir": "logs", "limits": limits}, tmp_path, "test"
    )


def folder(settings: Settings, name: str) -> Path:
    root = account_folder(settings, name).root
    root.mkdir(parents=True, exist_ok=True)
    return root


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


# -- the folder scan -----------------------------------------------------------------------


def test_usage_counts_regular_files_only(tmp_path: Path) -> None:
    root = tmp_path / "acct"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"x" * 100)
    (root / "sub" / "b.txt").write_bytes(b"x" * 20)
    (root / "sub" / "deeper" / "c.txt").write_bytes(b"x" * 3)
    (root / ".ingest-upload-abc-d.txt").write_bytes(b"x" * 5000)  # in flight: reserved
    (root / ".ingest-pool-0abc").write_bytes(b"x" * 4000)  # a killed pool publish's leftover
    (root / ".ingest-log-trim-77").write_bytes(b"x" * 3000)  # a killed log trim's
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 7000)
    (root / "link.bin").symlink_to(outside)
    (root / "linkdir").symlink_to(tmp_path)
    assert account_usage(root) == 123
    assert account_usage(tmp_path / "missing") == 0


# -- LocalLedger ---------------------------------------------------------------------------


def test_sessions_per_account_are_capped_and_given_back(tmp_path: Path) -> None:
    ledger = LocalLedger(make_settings(tmp_path, max_sessions_per_account=2))

    async def scenario() -> None:
        assert await ledger.open_session("alpha")
        assert await ledger.open_session("alpha")
        assert not await ledger.open_session("alpha")
        assert await ledger.open_session("beta")  # another account has its own allowance
        ledger.close_session("alpha")
        assert await ledger.open_session("alpha")
        for _ in range(5):  # more closes than opens cannot make room beyond the limit
            ledger.close_session("beta")
        assert ledger.sessions("beta") == 0

    run(scenario())


def test_no_session_limit_when_zero(tmp_path: Path) -> None:
    ledger = LocalLedger(make_settings(tmp_path, max_sessions_per_account=0))

    async def scenario() -> None:
        assert all([await ledger.open_session("alpha") for _ in range(50)])

    run(scenario())


def test_reservations_hold_the_quota_across_uploads(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, account_quota_bytes=1000)
    (folder(settings, "alpha") / "old.txt").write_bytes(b"x" * 300)
    ledger = LocalLedger(settings)

    async def scenario() -> None:
        assert await ledger.reserve("alpha", 400)  # 300 + 400
        assert await ledger.reserve("alpha", 300)  # 300 + 700 = the quota exactly
        assert not await ledger.reserve("alpha", 1)
        assert await ledger.reserve("beta", 1000)  # beta's folder is its own
        # The first upload commits 350 bytes of its 400 (a new file): 650 committed.
        ledger.settle("alpha", 400, 350)
        assert ledger.usage("alpha") == (650, 300)
        assert await ledger.reserve("alpha", 50)
        assert not await ledger.reserve("alpha", 1)
        ledger.settle("alpha", 350, 0)  # the rest is discarded: nothing committed
        ledger.settle("alpha", 0, -300)  # old.txt removed
        assert ledger.usage("alpha") == (350, 0)
        assert await ledger.reserve("alpha", 650)

    run(scenario())


def test_no_quota_means_no_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path, account_quota_bytes=0)
    ledger = LocalLedger(settings)
    monkeypatch.setattr(ledger_module, "account_usage", lambda root: pytest.fail("scanned"))

    async def scenario() -> None:
        assert await ledger.reserve("alpha", 10**15)
        ledger.settle("alpha", 10**15, 5)

    run(scenario())


def test_the_folder_is_scanned_in_a_thread_once_then_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, account_quota_bytes=10_000)
    root = folder(settings, "alpha")
    (root / "a.txt").write_bytes(b"x" * 1000)
    scans: list[str] = []
    real = ledger_module.account_usage

    def counted(path: Path) -> int:
        scans.append(threading.current_thread().name)
        return real(path)

    monkeypatch.setattr(ledger_module, "account_usage", counted)
    ledger = LocalLedger(settings)

    async def scenario() -> None:
        # Many requests at once share one scan; later ones use the figure.
        results = await asyncio.gather(*(ledger.reserve("alpha", 10) for _ in range(20)))
        assert all(results)
        for _ in range(20):
            assert await ledger.reserve("alpha", 10)
            ledger.settle("alpha", 10, 0)

    run(scenario())
    assert len(scans) == 1
    assert scans[0] != threading.main_thread().name


def test_an_old_figure_is_measured_again(tmp_path: Path) -> None:
    """Files the loader deletes or an operator copies are seen after ``usage_max_age``."""
    settings = make_settings(tmp_path, account_quota_bytes=1000)
    root = folder(settings, "alpha")
    (root / "feed.txt").write_bytes(b"x" * 900)
    ledger = LocalLedger(settings, usage_max_age=0.0)

    async def scenario() -> None:
        assert not await ledger.reserve("alpha", 200)
        await wait_for(lambda: not scanning(ledger))
        (root / "feed.txt").unlink()  # the nightly load took it
        # The stale figure answers now while a new scan runs; the one after sees it.
        await ledger.reserve("alpha", 0)
        await wait_for(lambda: ledger.usage("alpha")[0] == 0)
        assert await ledger.reserve("alpha", 1000)
        await wait_for(lambda: not scanning(ledger))
        (root / "copied.txt").write_bytes(b"x" * 500)  # the operator copies a file in
        await ledger.reserve("alpha", 0)
        await wait_for(lambda: ledger.usage("alpha")[0] == 500)
        assert not await ledger.reserve("alpha", 1)  # 500 + 1000 reserved

    run(scenario())


def test_a_scan_never_counts_reserved_bytes_twice(tmp_path: Path) -> None:
    """Bytes of an upload in flight are in its hidden temporary file (skipped by the scan)
    and in its reservation; after it commits they are in the folder and in the figure."""
    settings = make_settings(tmp_path, account_quota_bytes=1000)
    root = folder(settings, "alpha")
    ledger = LocalLedger(settings, usage_max_age=0.0)

    async def scenario() -> None:
        assert await ledger.reserve("alpha", 600)
        (root / ".ingest-upload-t1-up.txt").write_bytes(b"x" * 600)
        await ledger.reserve("alpha", 0)
        await wait_for(lambda: ledger.usage("alpha") == (0, 600) and not scanning(ledger))
        os.rename(root / ".ingest-upload-t1-up.txt", root / "up.txt")
        ledger.settle("alpha", 600, 600)
        assert ledger.usage("alpha") == (600, 0)
        await ledger.reserve("alpha", 0)
        await wait_for(lambda: ledger.usage("alpha") == (600, 0) and not scanning(ledger))
        assert await ledger.reserve("alpha", 400)
        assert not await ledger.reserve("alpha", 1)

    run(scenario())


def test_a_settle_during_a_scan_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan reads the folder before an upload's rename; the settle comes while it runs."""
    settings = make_settings(tmp_path, account_quota_bytes=1000)
    root = folder(settings, "alpha")
    (root / "a.txt").write_bytes(b"x" * 100)
    gate = threading.Event()
    real = ledger_module.account_usage

    def slow(path: Path) -> int:
        used = real(path)
        gate.wait(10)
        return used

    monkeypatch.setattr(ledger_module, "account_usage", slow)
    ledger = LocalLedger(settings)

    async def scenario() -> None:
        first = asyncio.ensure_future(ledger.reserve("alpha", 300))
        await wait_for(lambda: scanning(ledger))
        (root / "b.txt").write_bytes(b"x" * 300)  # committed after the scan looked
        ledger.settle("alpha", 0, 300)  # another session's upload, settled while it runs
        gate.set()
        assert await first
        committed, _reserved = ledger.usage("alpha")
        assert committed == 400

    run(scenario())


def scanning(ledger: LocalLedger) -> bool:
    return any(book.scan is not None for book in ledger._books.values())


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- RemoteLedger <-> the listener, over a real control channel ----------------------------


class Listener:
    """The listener's side for one worker: a real channel end and a LedgerService."""

    def __init__(self, local: LocalLedger, channel: ControlChannel):
        self.channel = channel
        self.service = LedgerService(local, channel.send)
        self.seen: list[Message] = []
        channel.watch(self._message, self.service.release_all)

    def _message(self, message: Message, sock: socket.socket | None) -> None:
        self.seen.append(message)
        if "ledger" in message:
            self.service.handle(message)


def worker_end(sock: socket.socket, timeout: float = 5.0) -> tuple[ControlChannel, RemoteLedger]:
    """A worker's end: its channel and a RemoteLedger that reads answers from it."""
    channel = ControlChannel(sock)
    remote = RemoteLedger(channel.send, timeout=timeout)

    def message(msg: Message, _sock: socket.socket | None) -> None:
        if "ledger_reply" in msg:
            remote.answer(msg)

    channel.watch(message, remote.listener_gone)
    return channel, remote


def test_sessions_count_across_workers_and_return_when_one_dies(tmp_path: Path) -> None:
    local = LocalLedger(make_settings(tmp_path, max_sessions_per_account=3))

    async def scenario() -> None:
        ours1, theirs1 = ControlChannel.pair()
        ours2, theirs2 = ControlChannel.pair()
        listener1, listener2 = Listener(local, ours1), Listener(local, ours2)
        worker1, remote1 = worker_end(theirs1)
        worker2, remote2 = worker_end(theirs2)
        assert await remote1.open_session("alpha")
        assert await remote1.open_session("alpha")
        assert await remote2.open_session("alpha")
        assert not await remote2.open_session("alpha")  # 3 across both workers
        assert not await remote1.open_session("alpha")
        remote2.close_session("alpha")
        await wait_for(lambda: local.sessions("alpha") == 2)
        remote2.close_session("alpha")  # one more than it holds: ignored by the listener
        await asyncio.sleep(0.05)
        assert local.sessions("alpha") == 2
        worker1.close()  # worker 1 dies holding two sessions
        await wait_for(lambda: local.sessions("alpha") == 0)
        assert listener1.service.gone and not listener2.service.gone
        assert all([await remote2.open_session("alpha") for _ in range(3)])
        worker2.close()
        for end in (ours1, ours2):
            end.close()

    run(scenario())


def test_reservations_count_across_workers_and_return_when_one_dies(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, account_quota_bytes=1000)
    (folder(settings, "alpha") / "kept.txt").write_bytes(b"x" * 100)
    local = LocalLedger(settings)

    async def scenario() -> None:
        ours1, theirs1 = ControlChannel.pair()
        ours2, theirs2 = ControlChannel.pair()
        Listener(local, ours1)
        Listener(local, ours2)
        worker1, remote1 = worker_end(theirs1)
        worker2, remote2 = worker_end(theirs2)
        assert await remote1.reserve("alpha", 500)
        assert await remote2.reserve("alpha", 400)
        assert not await remote2.reserve("alpha", 1)
        assert not await remote1.reserve("alpha", 1)
        remote2.settle("alpha", 400, 250)  # an upload of 250 bytes committed
        await wait_for(lambda: local.usage("alpha") == (350, 500))
        remote2.settle("alpha", 10_000, 0)  # more than it reserved: only what it holds
        await asyncio.sleep(0.05)
        assert local.usage("alpha") == (350, 500)
        worker1.close()  # dies with 500 bytes reserved (its temporary file is gone too)
        await wait_for(lambda: local.usage("alpha") == (350, 0))
        assert await remote2.reserve("alpha", 650)
        worker2.close()
        for end in (ours1, ours2):
            end.close()

    run(scenario())


def test_an_unanswered_request_is_refused_and_a_late_yes_given_back(tmp_path: Path) -> None:
    """A listener that does not answer in time: the worker refuses (fails closed); when the
    "yes" comes after all, the worker gives the session back."""
    local = LocalLedger(make_settings(tmp_path, max_sessions_per_account=1))

    async def scenario() -> None:
        ours, theirs = ControlChannel.pair()
        worker, remote = worker_end(theirs, timeout=0.2)
        held: list[Message] = []
        ours.watch(lambda m, s: held.append(m), lambda: None)  # reads but does not answer
        assert not await remote.open_session("alpha")
        await wait_for(lambda: len(held) == 1)
        # The listener answers late (it granted the session).
        ours.unwatch()
        service = Listener(local, ours).service
        service.handle(held[0])
        # The "yes" reaches the worker, which no longer waits for it and gives it back.
        await wait_for(lambda: not remote._abandoned and local.sessions("alpha") == 0)
        assert not service.held.sessions
        assert await remote.open_session("alpha")  # the slot was not lost
        worker.close()
        ours.close()

    run(scenario())


def test_a_gone_listener_refuses_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        ours, theirs = ControlChannel.pair()
        worker, remote = worker_end(theirs, timeout=30.0)
        ours.watch(lambda m, s: None, lambda: None)
        waiting = asyncio.ensure_future(remote.reserve("alpha", 10))
        await asyncio.sleep(0.05)
        ours.close()  # the listener exits with the request open
        assert await asyncio.wait_for(waiting, 5) is False
        assert await remote.open_session("alpha") is False
        remote.settle("alpha", 10, 0)  # fire-and-forget: no error
        remote.close_session("alpha")
        worker.close()

    run(scenario())


def test_a_grant_to_a_worker_that_died_meanwhile_is_given_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener is still measuring the folder when the asking worker dies."""
    settings = make_settings(tmp_path, account_quota_bytes=1000)
    folder(settings, "alpha")
    gate = threading.Event()
    real = ledger_module.account_usage

    def slow(path: Path) -> int:
        gate.wait(10)
        return real(path)

    monkeypatch.setattr(ledger_module, "account_usage", slow)
    local = LocalLedger(settings)

    async def scenario() -> None:
        ours, theirs = ControlChannel.pair()
        listener = Listener(local, ours)
        worker, remote = worker_end(theirs)
        asking = asyncio.ensure_future(remote.reserve("alpha", 700))
        await wait_for(lambda: scanning(local))
        worker.close()
        await wait_for(lambda: listener.service.gone)
        gate.set()
        await listener.service.drain()
        assert local.usage("alpha") == (0, 0)
        asking.cancel()  # (the worker process is gone with it)
        ours.close()

    run(scenario())


def test_many_messages_to_a_slow_reader_are_queued_not_lost() -> None:
    """A ``closed`` or ``settle`` must never be dropped because the buffer is full."""

    async def scenario() -> None:
        ours, theirs = ControlChannel.pair()
        sender = ControlChannel(theirs)
        count = 20_000  # far beyond the socket buffer
        for n in range(count):
            sender.send({"closed": n})
        assert sender.queued > 0
        got: list[int] = []
        ours.watch(lambda m, s: got.append(m["closed"]), lambda: None)
        await wait_for(lambda: len(got) == count)
        assert got == list(range(count)) and sender.queued == 0
        sender.close()
        ours.close()

    run(scenario())


# -- several nodes, the control DB gone ------------------------------------------------------


def test_without_the_control_db_each_node_counts_its_own_and_warns(tmp_path: Path) -> None:
    """Several nodes, and the control DB stops answering (here: a loopback port nobody
    listens on): the node's own books still decide, so clients are not locked out, and one
    ``holdings.unavailable`` warning says so (not one per question)."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from ingest_core.db import ControlDB
    from ingest_core.holdings import ClusterHoldings

    class Warnings:
        def __init__(self) -> None:
            self.events: list[tuple[str, dict[str, Any]]] = []

        def warning(self, event: str, **fields: Any) -> None:
            self.events.append((event, fields))

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    engine = create_engine(f"postgresql+psycopg://nobody@127.0.0.1:{port}/gone?connect_timeout=2")
    gone = ClusterHoldings(ControlDB(engine, sessionmaker(engine)), "node-a")
    settings = make_settings(tmp_path, max_sessions_per_account=2, account_quota_bytes=1000)
    folder(settings, "alpha")
    audit = Warnings()

    async def scenario() -> None:
        ledger = LocalLedger(settings, cluster=gone, audit=audit)
        assert await ledger.open_session("alpha")
        assert await ledger.open_session("alpha")
        assert not await ledger.open_session("alpha")  # this node's limit still holds
        assert await ledger.reserve("alpha", 600)
        assert not await ledger.reserve("alpha", 600)  # and this node's quota
        ledger.close_session("alpha")
        await asyncio.sleep(0.1)  # the publisher tries, fails, waits to retry
        await ledger.close()

    run(scenario())
    assert [event for event, _ in audit.events] == ["holdings.unavailable"]
    assert "counted on this node only" in audit.events[0][1]["effect"]
