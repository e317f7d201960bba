"""The activity journal: what clients did, in the control DB, from every node alike.

Each server process copies the events operators look for (logins, failed logins, refused
connections, files received, downloaded, renamed, removed, uploads discarded, limit hits,
session ends) from its JSON log into ``journal_events``, with its node id, so
``ingestctl activity`` shows the same rows on every node. The JSON log stays the complete
record: the journal is a copy that may lose rows, the log may not.

The server never waits for the journal. Rows go through a :class:`JournalWriter`: the log
call only appends to an in-memory queue; a background thread writes batches. When the queue
is full, the control DB is unreachable, or one client's session floods it past its budget,
ordinary rows are dropped and counted (a ``journal.dropped`` line at most once a minute).
``file.received`` rows are different: they are the pre-check's work items, so they are
written at once (usually within milliseconds of the upload's commit), kept and retried while
the DB is down, never over budget, and dropped only past a large bound, with an error line.

Rows older than ``[cluster] journal_retention_days`` (and defender failures older than the
defender's window) are deleted once an hour by the listener's writer, in bounded batches.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import InterfaceError, OperationalError

from ingest_core.db import ControlDB, DefenderFailure, JournalEvent, open_control_db, utcnow
from ingest_core.settings import Settings
from ingest_core.structured_log import add_event_sink, remove_event_sink

# The server log's events that are journaled.
JOURNALED_EVENTS = frozenset(
    {
        "auth.success",
        "auth.failure",
        "connection.refused",
        "channel.refused",
        "file.received",
        "file.download",
        "file.renamed",
        "file.removed",
        "upload.discarded",
        "limit.hit",
        "session.end",
        "session.idle_closed",
    }
)
RECEIVED = "file.received"
# Log fields that are columns (or mean nothing outside the log file), not detail.
_NOT_DETAIL = frozenset({"event", "timestamp", "level", "component", "pid", "account", "address"})

# Ordinary rows waiting for the writer; past it they are dropped.
QUEUE_LIMIT = 10_000
# file.received rows kept while the DB is down (a few hundred bytes each); past it, dropped
# with an error line.
RECEIVED_LIMIT = 100_000
BATCH_ROWS = 500
# After the first row of a quiet spell the writer waits this long for more, so a session's
# few rows (login, file, end) and its neighbours' share one transaction (one fsync) instead
# of one each; a received file still reaches the pre-check well within a second.
BATCH_LINGER_SECONDS = 0.1
# Per (account, address): a burst of this many ordinary rows, then this many a second.
BUDGET_BURST = 120
BUDGET_PER_SECOND = 2.0
BUDGET_KEYS = 10_000
# Waits between attempts while the DB is unreachable: doubling from the first to the last.
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0
DROP_REPORT_SECONDS = 60.0
PRUNE_EVERY_SECONDS = 3600.0
PRUNE_BATCH_ROWS = 5_000

_ACCOUNT_CHARS = 32
_ADDRESS_CHARS = 64
_NODE_CHARS = 64


def _column_text(value: Any, limit: int) -> str | None:
    """A value fit for a short text column on any backend: no NUL (PostgreSQL refuses it),
    no lone surrogate (a non-UTF-8 name), at most ``limit`` characters."""
    if value is None or value == "":
        return None if value is None else ""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00")[:limit]


def _event_time(value: Any) -> datetime:
    try:
        at = datetime.fromisoformat(str(value))
    except ValueError:
        return utcnow()
    return at if at.tzinfo is not None else utcnow()


def journal_row(event: Mapping[str, Any], node: str) -> dict[str, Any] | None:
    """The ``journal_events`` row for one log event, or None if it is not journaled."""
    kind = event.get("event")
    if kind not in JOURNALED_EVENTS:
        return None
    detail = {k: v for k, v in event.items() if k not in _NOT_DETAIL}
    account = _column_text(event.get("account"), _ACCOUNT_CHARS)
    if account is not None and account != event.get("account"):
        detail["user"] = event.get("account")  # a client's over-long or odd user name
    return {
        "at": _event_time(event.get("timestamp")),
        "node": _column_text(node, _NODE_CHARS) or "",
        "account": account,
        "kind": kind,
        "address": _column_text(event.get("address"), _ADDRESS_CHARS),
        # ASCII JSON: any name a client sent survives every backend and driver.
        "detail": json.dumps(detail, default=str, ensure_ascii=True),
    }


def record_rows(db: ControlDB, rows: list[dict[str, Any]]) -> None:
    """Insert journal rows in one transaction (blocking)."""
    if rows:
        with db.session.begin() as session:
            session.execute(insert(JournalEvent), rows)


def _db_unavailable(exc: BaseException) -> bool:
    """The DB could not be reached (retry later), as opposed to a row it refused."""
    return isinstance(exc, OperationalError | InterfaceError | OSError) or bool(
        getattr(exc, "connection_invalidated", False)
    )


class _Budget:
    """Token buckets per (account, address): one client cannot flood the journal."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[Any, Any], tuple[float, float]] = {}

    def allows(self, key: tuple[Any, Any], now: float) -> bool:
        tokens, since = self._buckets.get(key, (float(BUDGET_BURST), now))
        tokens = min(float(BUDGET_BURST), tokens + (now - since) * BUDGET_PER_SECOND)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        if len(self._buckets) >= BUDGET_KEYS and key not in self._buckets:
            self._buckets.clear()
        self._buckets[key] = (tokens - 1.0, now)
        return True


class JournalWriter:
    """Copies one process's journaled log events into the control DB from a thread.

    :meth:`record` is the log sink: it never blocks and never raises. ``prune`` (the
    listener's writer) also deletes expired rows once an hour.
    """

    def __init__(
        self,
        url: str,
        node: str,
        logger: Any,
        *,
        retention_days: int = 90,
        defender_window_seconds: int = 600,
        prune: bool = False,
        queue_limit: int = QUEUE_LIMIT,
        received_limit: int = RECEIVED_LIMIT,
    ) -> None:
        self.url = url
        self.node = node
        self.logger = logger
        self.retention_days = retention_days
        self.defender_window_seconds = defender_window_seconds
        self.prune = prune
        self.queue_limit = queue_limit
        self.received_limit = received_limit
        self.written = 0
        self.dropped: Counter[str] = Counter()  # by reason, since the last journal.dropped
        self._received: deque[dict[str, Any]] = deque()
        self._others: deque[dict[str, Any]] = deque()
        self._budget = _Budget()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._db: ControlDB | None = None
        self._failing_since: float | None = None
        self._next_report = 0.0
        self._next_prune = 0.0 if prune else float("inf")

    # -- the log side (the event loop's thread) ----------------------------------------------

    def record(self, event: Mapping[str, Any]) -> None:
        """Queue a log event's row if it is journaled; drop (and count) it when that is due."""
        try:
            row = journal_row(event, self.node)
        except Exception:
            return
        if row is None:
            return
        with self._wake:
            if row["kind"] == RECEIVED:
                if len(self._received) >= self.received_limit:
                    self.dropped["file.received kept too long"] += 1
                    return
                self._received.append(row)
            else:
                if not self._budget.allows((row["account"], row["address"]), time.monotonic()):
                    self.dropped["over one client's budget"] += 1
                    self._wake.notify()
                    return
                if len(self._others) >= self.queue_limit:
                    self.dropped["queue full"] += 1
                    self._wake.notify()  # the writer reports drops even with nothing to write
                    return
                self._others.append(row)
            self._wake.notify()

    def pending(self) -> int:
        with self._wake:
            return self.pending_locked()

    def pending_locked(self) -> int:
        """Rows queued (the caller holds ``_wake``)."""
        return len(self._received) + len(self._others)

    # -- the thread ---------------------------------------------------------------------------

    def start(self) -> JournalWriter:
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds), then end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        left = self.pending()
        if left:
            self.dropped["server stopping"] += left
        self._report_drops(force=True)

    def _run(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except Exception as exc:  # never let the thread die with rows still to come
                self.logger.error("journal.error", error=repr(exc)[:300])
                time.sleep(RETRY_MAX_SECONDS)

    def _step(self) -> bool:
        """Wait for rows, write a batch, report drops, prune when due; True: stop now."""
        with self._wake:
            while not (self._received or self._others or self._stopping):
                if not self._wake.wait(self._idle_wait()):
                    break  # time for a report or the hourly prune
            linger_until = time.monotonic() + BATCH_LINGER_SECONDS  # more rows join this batch
            while not self._stopping and self.pending_locked() < BATCH_ROWS:
                left = linger_until - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            stopping = self._stopping
            rows = self._take_batch()
        if rows:
            if not self._write(rows) and stopping:
                return True  # the DB is down: what is left is counted by stop()
        elif stopping:
            return True
        self._report_drops()
        if not stopping and time.monotonic() >= self._next_prune:
            self._prune()
        return False

    def _idle_wait(self) -> float:
        now = time.monotonic()
        due = min(self._next_prune, self._next_report if self.dropped else float("inf"))
        return max(min(due - now, PRUNE_EVERY_SECONDS), 0.05)

    def _take_batch(self) -> list[dict[str, Any]]:
        """Received files first (the pre-check waits for them), then the rest."""
        rows: list[dict[str, Any]] = []
        for source in (self._received, self._others):
            while source and len(rows) < BATCH_ROWS:
                rows.append(source.popleft())
        return rows

    def _control_db(self) -> ControlDB:
        if self._db is None:
            self._db = open_control_db(self.url)
        return self._db

    def _write(self, rows: list[dict[str, Any]]) -> bool:
        """Write a batch; True if the DB answered. Rows it refuses one by one are dropped; if
        it cannot be reached, received rows go back to the queue and the rest are dropped."""
        try:
            record_rows(self._control_db(), rows)
        except Exception as exc:
            if _db_unavailable(exc):
                self._db_failed(rows, exc)
                return False
            self._write_one_by_one(rows)
        else:
            self.written += len(rows)
        if self._failing_since is not None:
            self.logger.warning(
                "journal.resumed",
                unavailable_seconds=round(time.monotonic() - self._failing_since, 1),
            )
            self._failing_since = None
        return True

    def _write_one_by_one(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            try:
                record_rows(self._control_db(), [row])
                self.written += 1
            except Exception as exc:
                if _db_unavailable(exc):
                    self._db_failed([row], exc)
                    return
                with self._wake:
                    self.dropped["refused by the control DB"] += 1
                self.logger.error("journal.row_refused", kind=row["kind"], error=repr(exc)[:300])

    def _db_failed(self, rows: list[dict[str, Any]], exc: BaseException) -> None:
        received = [r for r in rows if r["kind"] == RECEIVED]
        with self._wake:
            self._received.extendleft(reversed(received))
            self.dropped["control DB unavailable"] += len(rows) - len(received)
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self.logger.error("journal.unavailable", error=repr(exc)[:300])
        # Wait (doubling) before the next attempt, unless told to stop.
        waited = now - self._failing_since
        delay = min(max(RETRY_FIRST_SECONDS, waited), RETRY_MAX_SECONDS)
        with self._wake:
            if not self._stopping:
                self._wake.wait(delay)

    def _report_drops(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._wake:
            if not self.dropped or (now < self._next_report and not force):
                return
            counts, self.dropped = dict(self.dropped), Counter()
        self._next_report = now + DROP_REPORT_SECONDS
        level = "error" if "file.received kept too long" in counts else "warning"
        getattr(self.logger, level)(
            "journal.dropped",
            rows=sum(counts.values()),
            reasons=counts,
            note="dropped journal rows are still in this log",
        )

    def _prune(self) -> None:
        self._next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
        try:
            removed = prune_journal(
                self._control_db(),
                self.retention_days,
                self.defender_window_seconds,
                between_batches=self._flush_received,
            )
        except Exception as exc:
            self.logger.error("journal.prune_failed", error=repr(exc)[:300])
            return
        if any(removed.values()):
            self.logger.info("journal.pruned", **removed)

    def _flush_received(self) -> None:
        """Between prune batches: received files do not wait for the prune to finish."""
        with self._wake:
            rows = [self._received.popleft() for _ in range(min(len(self._received), BATCH_ROWS))]
        if rows:
            self._write(rows)


def start_journal(settings: Settings, logger: Any, *, prune: bool) -> JournalWriter:
    """A started writer fed by every ``server`` log line of this process (see the module
    docstring); ``prune`` in the listener only. Call :func:`stop_journal` at shutdown."""
    writer = JournalWriter(
        settings.control_db_url,
        settings.node_id,
        logger,
        retention_days=settings.cluster.journal_retention_days,
        defender_window_seconds=settings.defender.window_seconds,
        prune=prune,
    ).start()
    add_event_sink(settings.log_dir, "server", writer.record)
    return writer


def stop_journal(settings: Settings, writer: JournalWriter, timeout: float = 5.0) -> None:
    remove_event_sink(settings.log_dir, "server", writer.record)
    writer.stop(timeout)


# -- retention ------------------------------------------------------------------------------


def _delete_older(db: ControlDB, table: Any, cutoff: datetime, batch: int) -> int:
    """Delete at most ``batch`` rows of ``table`` older than ``cutoff`` in one transaction."""
    oldest = select(table.id).where(table.at < cutoff).order_by(table.id).limit(batch)
    with db.session.begin() as session:
        ids = list(session.scalars(oldest))
        if not ids:
            return 0
        session.execute(delete(table).where(table.id.in_(ids)))
    return len(ids)


def prune_journal(
    db: ControlDB,
    retention_days: int,
    defender_window_seconds: int,
    *,
    now: datetime | None = None,
    batch: int = PRUNE_BATCH_ROWS,
    between_batches: Any = None,
) -> dict[str, int]:
    """Delete journal rows older than ``retention_days`` and defender failures older than
    the defender's window, ``batch`` rows per transaction (no long lock on a busy table)."""
    now = now or utcnow()
    cutoffs = {
        "journal_rows": (JournalEvent, now - timedelta(days=retention_days)),
        "defender_failures": (DefenderFailure, now - timedelta(seconds=defender_window_seconds)),
    }
    removed: dict[str, int] = {}
    for name, (table, cutoff) in cutoffs.items():
        removed[name] = 0
        while True:
            count = _delete_older(db, table, cutoff, batch)
            removed[name] += count
            if count < batch:
                break
            if between_batches is not None:
                between_batches()
    return removed


# -- reading --------------------------------------------------------------------------------


def event_from_row(row: JournalEvent) -> dict[str, Any]:
    """A journal row in the JSON log's shape (timestamp, event, account, address, then the
    detail fields), with the node and the row's id."""
    try:
        detail = json.loads(row.detail)
    except ValueError:
        detail = {}
    if not isinstance(detail, dict):
        detail = {}
    return {
        "id": row.id,
        "timestamp": row.at.isoformat(),
        "node": row.node,
        "event": row.kind,
        "account": row.account,
        "address": row.address,
        **{k: v for k, v in detail.items() if k not in _NOT_DETAIL and k not in ("id", "node")},
    }


def account_events(db: ControlDB, account: str, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` journal rows about ``account`` (0: all), oldest first."""
    query = (
        select(JournalEvent)
        .where(JournalEvent.account == account)
        .order_by(JournalEvent.at.desc(), JournalEvent.id.desc())
    )
    if limit:
        query = query.limit(limit)
    with db.session() as session:
        rows = list(session.scalars(query))
    return [event_from_row(row) for row in reversed(rows)]


def record_events(db: ControlDB, events: Iterable[Mapping[str, Any]], node: str) -> int:
    """Journal log-shaped events now (blocking; for tools and tests): how many were kept."""
    rows = [row for row in (journal_row(e, node) for e in events) if row is not None]
    for start in range(0, len(rows), BATCH_ROWS):
        record_rows(db, rows[start : start + BATCH_ROWS])
    return len(rows)
