"""The account ledger: logged-in sessions per account and quota reservations, server-wide.

One account must not hold every session slot or fill the disk from many sessions at once,
whichever worker process each session runs in. So one process keeps the books: the listener
(or the only process, with ``[server] workers`` = 1) owns a ``LocalLedger``; each worker
process asks it through a ``RemoteLedger`` over its control channel, and the listener's
``LedgerService`` for that worker remembers what the worker holds, to give it all back if
the worker dies.

Quota: an account's usage is its committed bytes (the regular files in its folder, measured
by a scan in a thread, again when the figure is older than ``USAGE_MAX_AGE``, so files the
loader deletes or an operator copies are seen) plus the bytes reserved by uploads in flight
(written to hidden temporary files, which the scan skips, so nothing counts twice). An
upload reserves before it writes and settles when it ends: its reservation is given back
and the committed figure moves by what the folder really gained. The scan skips every
temporary file of the service (uploads, pool file, log trim): one left by a process or node
that died is never the client's, and never counts against its quota while it waits to be
removed (``ingest_core.nodes``).

Several nodes (a PostgreSQL control DB): the listener of each also records what its node
holds per account in the control DB and asks, before one more session or reservation,
whether the account stays within its limits with what the other live nodes hold
(``ingest_core.holdings``): the session limit and the quota are the account's, not each
node's. The committed bytes are the shared folder's, so every node's scan sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ingest_core.folders import (
    LOG_TRIM_TEMP_PREFIX,
    POOL_TEMP_PREFIX,
    UPLOAD_TEMP_PREFIX,
    account_folder,
    files_under,
)
from ingest_core.holdings import ClusterHoldings
from ingest_core.settings import Settings

Message = dict[str, Any]
# Our temporary files: uploads in flight are covered by reservations; any other is either
# about to replace a service file or a leftover of a process that died.
SERVICE_TEMP_PREFIXES = (UPLOAD_TEMP_PREFIX, POOL_TEMP_PREFIX, LOG_TRIM_TEMP_PREFIX)

USAGE_MAX_AGE = 30.0  # seconds a measured folder usage is trusted before it is measured again
# Several nodes: how long a question to the control DB may take, how long the node then
# counts on its own books before it asks again, how often it retries recording its figures.
ASK_TIMEOUT = 5.0
DB_DOWN_SECONDS = 10.0
PUBLISH_RETRY_SECONDS = 1.0
WARN_EVERY_SECONDS = 60.0
REQUEST_TIMEOUT = 10.0  # seconds a worker waits for the listener's answer (then: refused)
_ABANDONED_MAX = 10_000  # timed-out requests remembered, to give back a late "yes"


class AccountLedger(Protocol):
    """What a session asks before it logs in and before it writes."""

    async def open_session(self, account: str) -> bool:
        """True (and counted) if the account has fewer than max_sessions_per_account."""
        ...

    def close_session(self, account: str) -> None:
        """Exactly once per open_session that returned True."""
        ...

    async def reserve(self, account: str, nbytes: int) -> bool:
        """True (and reserved) if committed + reserved + nbytes stays within the quota."""
        ...

    def settle(self, account: str, reserved: int, delta: int) -> None:
        """Give back ``reserved`` bytes of reservation; add ``delta`` to committed usage."""
        ...

    def used(self, account: str) -> int | None:
        """The account's bytes (stored and reserved) as last known, to tell a refused client;
        None when not known here."""
        ...


def account_usage(root: Path) -> int:
    """Bytes in the regular files under ``root`` (recursive), without symlinks and without
    the service's temporary files (uploads in flight are covered by reservations; leftovers
    of a process or node that died are not the client's)."""
    total = 0
    for entry in files_under(root):
        try:
            if entry.is_file(follow_symlinks=False) and not entry.name.startswith(
                SERVICE_TEMP_PREFIXES
            ):
                total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total


@dataclass
class _AccountBook:
    sessions: int = 0
    reserved: int = 0
    # With several nodes: one question to the other nodes' holdings at a time per account.
    asking: asyncio.Lock = field(default_factory=asyncio.Lock)
    committed: int | None = None  # None until first measured
    measured_at: float = 0.0  # monotonic time the last scan started
    scan: asyncio.Future[None] | None = None
    settled_during_scan: int = 0  # deltas a scan in flight may not have seen


class LocalLedger:
    """The authority: the books of every account, kept in this process.

    A scan started before an upload's rename may miss its file while its ``settle`` comes
    after the scan started: such deltas are added to the scan's result. One that saw the
    file and is settled later counts twice until the next scan (an overcount refuses a
    little early for at most ``USAGE_MAX_AGE``; it never lets the quota be passed).
    """

    def __init__(
        self,
        settings: Settings,
        usage_max_age: float = USAGE_MAX_AGE,
        cluster: ClusterHoldings | None = None,
        audit: Any = None,
    ):
        """``cluster``: the other nodes' holdings (several nodes sharing a PostgreSQL control
        DB): a session or reservation is then admitted only if the account stays within its
        limits across all of them; if the control DB does not answer, this node's own books
        decide (and a ``holdings.unavailable`` warning says so, at most once a minute)."""
        self.settings = settings
        self.usage_max_age = usage_max_age
        self._books: dict[str, _AccountBook] = {}
        self.cluster = cluster
        self.audit = audit
        # The control DB's work, on one thread, in the order it was asked for.
        self._db_thread = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="holdings") if cluster else None
        )
        self._unpublished: set[str] = set()
        self._publisher: asyncio.Task[None] | None = None
        self._warned_at = -math.inf
        self._db_down_until = -math.inf

    def _book(self, account: str) -> _AccountBook:
        book = self._books.get(account)
        if book is None:
            book = self._books[account] = _AccountBook()
        return book

    async def open_session(self, account: str) -> bool:
        limit = self.settings.limits.max_sessions_per_account
        book = self._book(account)
        if limit and book.sessions >= limit:
            return False
        if limit and self.cluster is not None:
            async with book.asking:
                if book.sessions >= limit:
                    return False
                agreed = await self._ask(
                    self.cluster.try_session, account, book.sessions + 1, book.reserved, limit
                )
                if not agreed:
                    return False
        book.sessions += 1
        self._changed(account)
        return True

    def close_session(self, account: str) -> None:
        book = self._book(account)
        book.sessions = max(book.sessions - 1, 0)
        self._changed(account)

    async def reserve(self, account: str, nbytes: int) -> bool:
        nbytes = max(int(nbytes), 0)
        quota = self.settings.limits.account_quota_bytes
        book = self._book(account)
        if not quota:
            book.reserved += nbytes
            return True
        await self._measure(account, book)
        if book.committed is None:  # could not be measured: refuse rather than guess
            return False
        if book.committed + book.reserved + nbytes > quota:
            return False
        if self.cluster is not None:
            async with book.asking:
                committed = book.committed
                if committed is None or committed + book.reserved + nbytes > quota:
                    return False
                agreed = await self._ask(
                    self.cluster.try_reserve,
                    account,
                    book.sessions,
                    book.reserved + nbytes,
                    quota,
                    committed,
                )
                if not agreed:
                    return False
        book.reserved += nbytes
        self._changed(account)
        return True

    def settle(self, account: str, reserved: int, delta: int) -> None:
        book = self._book(account)
        book.reserved = max(book.reserved - max(int(reserved), 0), 0)
        delta = int(delta)
        if book.scan is not None:
            book.settled_during_scan += delta
        if book.committed is not None:
            book.committed = max(book.committed + delta, 0)
        self._changed(account)

    # -- several nodes ------------------------------------------------------------------------

    async def _ask(self, question: Callable[..., bool], *args: Any) -> bool:
        """The other nodes' answer; True (this node's books decide) when the control DB does
        not answer, within ``ASK_TIMEOUT`` (a login must not hang on it), and for
        ``DB_DOWN_SECONDS`` after that without asking again."""
        if time.monotonic() < self._db_down_until:
            return True
        asked = asyncio.get_running_loop().run_in_executor(self._db_thread, question, *args)
        try:
            return await asyncio.wait_for(asked, ASK_TIMEOUT)
        except Exception as exc:
            self._db_down_until = time.monotonic() + DB_DOWN_SECONDS
            self._warn(exc if str(exc) else TimeoutError("the control DB did not answer"))
            return True

    def _changed(self, account: str) -> None:
        """This node's figures for ``account`` changed: record them for the other nodes
        (when there are limits for them to weigh)."""
        limits = self.settings.limits
        if self.cluster is None or not (
            limits.max_sessions_per_account or limits.account_quota_bytes
        ):
            return
        self._unpublished.add(account)
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.ensure_future(self._publish())

    async def _publish(self) -> None:
        """Write the changed figures (after the questions already asked: one thread, in
        order), until none is left; while the control DB does not answer, every second."""
        assert self.cluster is not None
        loop = asyncio.get_running_loop()
        while self._unpublished:
            accounts, self._unpublished = self._unpublished, set()
            figures = {a: (self._book(a).sessions, self._book(a).reserved) for a in accounts}
            try:
                await loop.run_in_executor(self._db_thread, self.cluster.publish, figures)
            except Exception as exc:
                self._warn(exc)
                self._unpublished |= accounts
                await asyncio.sleep(PUBLISH_RETRY_SECONDS)

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.audit is not None and now - self._warned_at >= WARN_EVERY_SECONDS:
            self._warned_at = now
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            self.audit.warning(
                "holdings.unavailable",
                error=first_line[:300],
                effect="sessions and quota are counted on this node only until the control "
                "DB answers",
            )

    def clear_own(self) -> None:
        """At start: what an earlier run of this node held is gone (blocking)."""
        if self.cluster is None:
            return
        try:
            self.cluster.clear_own()
        except Exception as exc:  # the rows lapse with the old heartbeat anyway
            self._warn(exc)

    async def close(self) -> None:
        """At shutdown: this node holds nothing any more (its rows go), and the thread ends."""
        if self.cluster is None or self._db_thread is None:
            return
        if self._publisher is not None:
            self._publisher.cancel()
        cleared = asyncio.get_running_loop().run_in_executor(
            self._db_thread, self.cluster.clear_own
        )
        with contextlib.suppress(Exception):  # else the rows lapse with the heartbeat
            await asyncio.wait_for(cleared, ASK_TIMEOUT)
        self._db_thread.shutdown(wait=False)

    def usage(self, account: str) -> tuple[int | None, int]:
        """(committed bytes as last measured and settled, bytes reserved) for reports."""
        book = self._book(account)
        return book.committed, book.reserved

    def used(self, account: str) -> int | None:
        committed, reserved = self.usage(account)
        return None if committed is None else committed + reserved

    def sessions(self, account: str) -> int:
        return self._book(account).sessions

    async def _measure(self, account: str, book: _AccountBook) -> None:
        """Start a scan when the figure is missing or old; wait only when it is missing."""
        fresh = time.monotonic() - book.measured_at < self.usage_max_age
        if book.committed is not None and fresh:
            return
        if book.scan is None:
            book.scan = asyncio.ensure_future(self._scan(account, book))
        if book.committed is None:
            await asyncio.shield(book.scan)

    async def _scan(self, account: str, book: _AccountBook) -> None:
        book.settled_during_scan = 0
        started = time.monotonic()
        root = account_folder(self.settings, account).root
        try:
            used = await asyncio.to_thread(account_usage, root)
        except Exception:  # never expected (OSError is skipped per entry): keep the old figure
            book.scan = None
            return
        book.committed = max(used + book.settled_during_scan, 0)
        book.measured_at = started
        book.settled_during_scan = 0
        book.scan = None


@dataclass
class _Holdings:
    """What one worker holds in the ledger, by account."""

    sessions: Counter[str] = field(default_factory=Counter)
    reserved: Counter[str] = field(default_factory=Counter)


class LedgerService:
    """The listener's side of one worker's ``RemoteLedger``.

    Answers its requests from the ``LocalLedger`` and remembers what it holds, so a worker
    can never give back more than it took and everything it held returns when it dies
    (``release_all``), also what is granted after its death.
    """

    def __init__(self, ledger: LocalLedger, reply: Callable[[Message], None], audit: Any = None):
        self.ledger = ledger
        self.reply = reply
        self.audit = audit
        self.held = _Holdings()
        self.gone = False
        self._tasks: set[asyncio.Task[None]] = set()

    def handle(self, message: Message) -> None:
        """One ``{"ledger": ...}`` message from the worker."""
        kind = message.get("ledger")
        account = message.get("account")
        if not isinstance(account, str) or not account:
            return
        if kind == "close_session":
            if self.held.sessions[account] > 0:
                self._take(self.held.sessions, account, 1)
                self.ledger.close_session(account)
        elif kind == "settle":
            reserved = min(_int(message.get("reserved")), self.held.reserved[account])
            self._take(self.held.reserved, account, max(reserved, 0))
            self.ledger.settle(account, max(reserved, 0), _int(message.get("delta")))
        elif kind in ("open_session", "reserve"):
            task = asyncio.ensure_future(self._answer(str(kind), account, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, kind: str, account: str, message: Message) -> None:
        nbytes = max(_int(message.get("bytes")), 0)
        try:
            if kind == "open_session":
                ok = await self.ledger.open_session(account)
            else:
                ok = await self.ledger.reserve(account, nbytes)
        except Exception as exc:  # a bug here must refuse one request, not stop the listener
            if self.audit is not None:
                self.audit.error("ledger.error", account=account, request=kind, error=repr(exc))
            ok = False
        if ok and self.gone:  # granted to a worker that died meanwhile: give it back now
            self._give_back(kind, account, nbytes)
            return
        if ok:
            if kind == "open_session":
                self.held.sessions[account] += 1
            else:
                self.held.reserved[account] += nbytes
        # If the worker is gone, release_all() gives back what it held.
        reply: Message = {"ledger_reply": message.get("id"), "ok": ok}
        if not ok and kind == "reserve":  # the worker tells its client how full the folder is
            reply["used"] = self.ledger.used(account)
        with contextlib.suppress(OSError):
            self.reply(reply)

    def _give_back(self, kind: str, account: str, nbytes: int) -> None:
        if kind == "open_session":
            self.ledger.close_session(account)
        else:
            self.ledger.settle(account, nbytes, 0)

    @staticmethod
    def _take(counter: Counter[str], account: str, amount: int) -> None:
        counter[account] -= amount
        if counter[account] <= 0:
            del counter[account]

    def release_all(self) -> None:
        """The worker is gone: give back every session and reservation it held."""
        self.gone = True
        for account, count in self.held.sessions.items():
            for _ in range(count):
                self.ledger.close_session(account)
        for account, nbytes in self.held.reserved.items():
            self.ledger.settle(account, nbytes, 0)
        self.held = _Holdings()

    async def drain(self) -> None:
        """Wait for answers still being worked out (at shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks))


@dataclass
class _Request:
    kind: str
    account: str
    nbytes: int
    answer: asyncio.Future[bool]


class RemoteLedger:
    """A worker's ledger: every question goes to the listener's ``LocalLedger``.

    ``open_session`` and ``reserve`` wait for the answer at most ``timeout`` seconds and say
    False (refuse) on timeout or when the listener is gone; a "yes" that comes after the
    timeout is given back at once. ``close_session`` and ``settle`` are sent and not
    answered. ``send`` raises OSError when the message cannot go (the listener is gone).
    """

    def __init__(self, send: Callable[[Message], None], timeout: float = REQUEST_TIMEOUT):
        self.send = send
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, _Request] = {}
        self._abandoned: dict[int, _Request] = {}
        self._used: dict[str, int] = {}  # per account, from the listener's last refusal
        self.listener_is_gone = False

    async def open_session(self, account: str) -> bool:
        return await self._ask("open_session", account, 0)

    def close_session(self, account: str) -> None:
        self._tell({"ledger": "close_session", "account": account})

    async def reserve(self, account: str, nbytes: int) -> bool:
        return await self._ask("reserve", account, max(int(nbytes), 0))

    def settle(self, account: str, reserved: int, delta: int) -> None:
        self._tell(
            {"ledger": "settle", "account": account, "reserved": int(reserved), "delta": int(delta)}
        )

    def used(self, account: str) -> int | None:
        return self._used.get(account)

    async def _ask(self, kind: str, account: str, nbytes: int) -> bool:
        if self.listener_is_gone:
            return False
        number = next(self._ids)
        request = _Request(kind, account, nbytes, asyncio.get_running_loop().create_future())
        message: Message = {"ledger": kind, "id": number, "account": account}
        if kind == "reserve":
            message["bytes"] = nbytes
        self._pending[number] = request
        try:
            self.send(message)
        except OSError:
            del self._pending[number]
            return False
        try:
            return await asyncio.wait_for(asyncio.shield(request.answer), self.timeout)
        except TimeoutError:
            self._abandon(number, request)
            return False
        except asyncio.CancelledError:
            self._abandon(number, request)
            raise

    def _abandon(self, number: int, request: _Request) -> None:
        """The asker stopped waiting: a "yes" already here, or one still to come, goes back."""
        self._pending.pop(number, None)
        if request.answer.done():
            if request.answer.result():
                self._give_back(request)
            return
        request.answer.cancel()
        if len(self._abandoned) >= _ABANDONED_MAX:
            self._abandoned.pop(next(iter(self._abandoned)))
        self._abandoned[number] = request

    def _give_back(self, request: _Request) -> None:
        if request.kind == "open_session":
            self.close_session(request.account)
        else:
            self.settle(request.account, request.nbytes, 0)

    def _tell(self, message: Message) -> None:
        if self.listener_is_gone:
            return
        with contextlib.suppress(OSError):  # the listener is gone; it counts nothing any more
            self.send(message)

    def answer(self, message: Message) -> None:
        """A ``{"ledger_reply": N, "ok": BOOL}`` from the listener."""
        number = message.get("ledger_reply")
        ok = bool(message.get("ok"))
        if not isinstance(number, int):
            return
        request = self._pending.pop(number, None)
        if request is not None and isinstance(message.get("used"), int):
            if len(self._used) > 10_000:
                self._used.clear()
            self._used[request.account] = message["used"]
        if request is not None:
            if not request.answer.done():
                request.answer.set_result(ok)
            return
        late = self._abandoned.pop(number, None)
        if late is not None and ok:
            self._give_back(late)

    def listener_gone(self) -> None:
        """The control channel closed: refuse everything still waiting and all that follows."""
        self.listener_is_gone = True
        for request in self._pending.values():
            if not request.answer.done():
                request.answer.set_result(False)
        self._pending.clear()
        self._abandoned.clear()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
